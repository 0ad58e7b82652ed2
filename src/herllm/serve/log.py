"""The interaction log: every finished exchange of the server, durably, as experience.

One SQLite file, ``RUN_DIR/interactions.sqlite`` (WAL, ``synchronous=FULL``): a row per
finished exchange (its messages, answer, model version, user and time), written in ONE
transaction before the response's final bytes (`[DONE]` of a stream, the JSON body otherwise)
are sent, so every exchange a client saw completed is in the log, exactly once (the completion
id is the primary key). A request that fails validation or is cut off never writes a row.

Feedback (thumbs up / down, a corrected answer) updates the row: a correction becomes the
training target, a thumbs-down row is not trained on. The learner freezes its decision for a
row (`learn` = ``train`` / ``skip``, `target`) the first time it reads it
(`herllm.serve.log_source`), so a resumed learner sees the same documents in the same order;
feedback that comes after that is kept in the row but no longer changes what was learned.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

LOG_FILE = "interactions.sqlite"

SCHEMA = """
CREATE TABLE IF NOT EXISTS exchanges (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,            -- chat | completion
    user TEXT NOT NULL,
    created REAL NOT NULL,         -- unix time the exchange finished
    model TEXT NOT NULL,
    version TEXT NOT NULL,         -- the adapter version that answered
    messages TEXT NOT NULL,        -- JSON: the conversation asked (chat) or [] (completion)
    prompt TEXT NOT NULL,          -- the conversation rendered for the model, without facts
    answer TEXT NOT NULL,
    finish_reason TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    facts TEXT NOT NULL DEFAULT '[]',  -- JSON: ids of the knowledge items put in the prompt
    rating TEXT,                   -- up | down | NULL
    correction TEXT,               -- a corrected answer: the training target
    feedback_at REAL,
    learn TEXT,                    -- the learner's frozen decision: train | skip | NULL (unread)
    target TEXT                    -- what was trained on (answer or correction)
);
CREATE INDEX IF NOT EXISTS exchanges_user ON exchanges (user);
"""


@dataclass(frozen=True)
class Exchange:
    """One finished exchange, as the server hands it to the log."""

    id: str
    kind: str
    user: str
    model: str
    version: str
    messages: list[dict]
    prompt: str
    answer: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    facts: list[str] = field(default_factory=list)
    created: float = 0.0


class FeedbackError(LookupError):
    """Feedback on an exchange that does not exist or is not the caller's."""


class InteractionLog:
    """The server's side of the log (see module doc); one connection, thread-safe."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = connect(self.path)
        self._conn.executescript(SCHEMA)

    def close(self) -> None:
        self._conn.close()

    def append(self, ex: Exchange) -> None:
        """Write one finished exchange in one transaction (durable on return)."""
        row = (ex.id, ex.kind, ex.user, ex.created or time.time(), ex.model, ex.version,
               json.dumps(ex.messages), ex.prompt, ex.answer, ex.finish_reason,
               ex.prompt_tokens, ex.completion_tokens, json.dumps(ex.facts))  # fmt: skip
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.execute(
                    "INSERT INTO exchanges (id, kind, user, created, model, version, messages, "
                    "prompt, answer, finish_reason, prompt_tokens, completion_tokens, facts) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    row,
                )
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def feedback(
        self, exchange_id: str, user: str, rating: str | None, correction: str | None
    ) -> dict:
        """Record feedback on the caller's own exchange; says whether it can still change
        what the learner trains on (it cannot once the learner has read the row)."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                row = self._conn.execute(
                    "SELECT user, learn FROM exchanges WHERE id = ?", (exchange_id,)
                ).fetchone()
                if row is None or row[0] != user:  # another user's id reads as unknown
                    raise FeedbackError(exchange_id)
                self._conn.execute(
                    "UPDATE exchanges SET rating = COALESCE(?, rating), "
                    "correction = COALESCE(?, correction), feedback_at = ? WHERE id = ?",
                    (rating, correction, time.time(), exchange_id),
                )
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")
        return {"applies_to_training": row[1] is None}

    def get(self, exchange_id: str) -> dict | None:
        with self._lock:
            cur = self._conn.execute("SELECT * FROM exchanges WHERE id = ?", (exchange_id,))
            row = cur.fetchone()
            return (
                None
                if row is None
                else dict(zip([c[0] for c in cur.description], row, strict=True))
            )

    def rows(self, user: str | None = None) -> list[dict]:
        """Every exchange (of `user`), in log order (for export and tests)."""
        with self._lock:
            q, args = "SELECT * FROM exchanges", ()
            if user is not None:
                q, args = q + " WHERE user = ?", (user,)
            cur = self._conn.execute(q + " ORDER BY seq", args)
            cols = [c[0] for c in cur.description]
            return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]

    def forget_user(self, user: str) -> int:
        """Delete every exchange of `user` (admin); returns how many rows went."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            n = self._conn.execute("DELETE FROM exchanges WHERE user = ?", (user,)).rowcount
            self._conn.execute("COMMIT")
        return n


def connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    return conn


class InFlight:
    """How many requests the server is answering, in a small file beside the log, so the
    learner (another process) trains only while it is zero. The file names the server's pid:
    a count left by a server that died is ignored."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._n = 0
        self._lock = threading.Lock()
        self._write()

    @property
    def count(self) -> int:
        return self._n

    def __enter__(self) -> InFlight:
        with self._lock:
            self._n += 1
            self._write()
        return self

    def __exit__(self, *exc) -> None:
        with self._lock:
            self._n -= 1
            self._write()

    def _write(self) -> None:
        import os

        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"in_flight": self._n, "pid": os.getpid(), "t": time.time()}))
        os.replace(tmp, self.path)


def server_busy(path: str | Path, quiet: float = 0.0) -> bool:
    """Whether a live server reports requests in flight, or had one less than `quiet` seconds
    ago (the learner's side of `InFlight`: it waits for a pause in the traffic, not only for
    the gap between two back-to-back requests)."""
    import os

    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return False
    recent = quiet > 0 and time.time() - float(data.get("t", 0.0)) < quiet
    if data.get("in_flight", 0) <= 0 and not recent:
        return False
    try:
        os.kill(int(data["pid"]), 0)
    except (OSError, KeyError, ValueError):
        return False  # the server that wrote it is gone
    return True
