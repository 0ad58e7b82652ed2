"""Persistent replay buffer: past experiences kept in SQLite, sampled for rehearsal.

Design
------
* Storage is one SQLite file in WAL mode with three tables: ``rows`` (small, hot
  metadata: row id, doc id, offset, step first seen, last score, times replayed),
  ``payload`` (token ids and loss mask as blobs) and ``meta`` (the buffer's own state).
  Both row tables are keyed by ``slot`` in ``[0, capacity)``; a full buffer replaces a
  slot in place, so lookups stay B-tree point reads however large the file grows.
* Rows are tied to checkpoints. The writer keeps ONE open transaction between
  checkpoints; :meth:`ReplayBuffer.commit` stores the RNG state, counters and ``step``
  in ``meta`` and commits. A crash (or :meth:`close` without commit) rolls back
  everything since the last commit, so reopening gives exactly the state that the
  checkpoint of ``committed_step`` saw, and replaying the same operations gives the
  same samples.
* Policies (``herllm.memory.policies``, registered by name): every one admits with
  algorithm R over every item offered, so the buffer spans the whole stream; a policy
  picks the victim and draws samples. ``reservoir`` replaces algorithm R's slot and draws
  uniformly; ``priority`` draws proportionally to ``(max(score, 0) + eps) ** alpha``
  (scores refreshed with :meth:`ReplayBuffer.update_scores`) and replaces the lowest
  score ("admit only if higher than the minimum" would freeze the buffer on the stream's
  start). Its in-memory score index is rebuilt from ``rows`` on open.
* ``readonly=True`` opens the file with ``mode=ro``: it sees only committed rows, never
  writes (``times_replayed`` is not incremented) and draws from its own RNG seeded by
  ``seed`` (give each DDP rank its own seed). :meth:`refresh` picks up newer commits.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from herllm.memory.items import BufferItem, BufferRow
from herllm.memory.policies import PRIORITY_EPS, REPLAY_POLICIES, replay_policy_names

__all__ = ["POLICIES", "PRIORITY_EPS", "BufferItem", "BufferRow", "ReplayBuffer"]

POLICIES = replay_policy_names()  # the built-in ones; the check reads the registry
SCHEMA_VERSION = 1
_COUNTERS = ("offered", "added", "evicted", "sampled", "score_updates")
_ROW_COLS = (
    "r.slot, r.row_id, r.doc_id, r.offset, r.step_first_seen, r.last_score, r.times_replayed"
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS rows (
    slot INTEGER PRIMARY KEY, row_id INTEGER NOT NULL UNIQUE, doc_id TEXT NOT NULL,
    offset INTEGER NOT NULL, step_first_seen INTEGER NOT NULL, last_score REAL NOT NULL,
    times_replayed INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS payload (
    slot INTEGER PRIMARY KEY, input_ids BLOB NOT NULL, loss_mask BLOB);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _is_count(value: object) -> bool:
    """True for a non-negative Python or numpy integer (not bool)."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool) and value >= 0


class ReplayBuffer:
    """Capped, persistent replay buffer with ``reservoir`` or ``priority`` policy.

    Args:
        path: SQLite file (created if missing; its directory must exist).
        capacity: Maximum number of rows kept; must match the file's when reopening.
        policy: ``"reservoir"`` or ``"priority"``; must match the file's when reopening.
        seed: Seed of the sampling/admission RNG. On reopen the writer resumes the RNG
            state saved by the last commit; a read-only buffer uses ``seed`` itself.
        alpha: Priority exponent (``priority`` only), ``>= 0``.
        readonly: Open an existing file for sampling only; never writes.
    """

    def __init__(
        self,
        path: str | Path,
        capacity: int,
        policy: str = "reservoir",
        seed: int = 0,
        alpha: float = 1.0,
        *,
        readonly: bool = False,
    ) -> None:
        _check(
            policy in REPLAY_POLICIES,
            f"ReplayBuffer: unknown policy {policy!r}; use one of {replay_policy_names()}",
        )
        _check(
            _is_count(capacity) and capacity > 0,
            f"ReplayBuffer: capacity must be a positive int, got {capacity!r}",
        )
        _check(
            math.isfinite(alpha) and alpha >= 0,
            f"ReplayBuffer: alpha must be a finite number >= 0, got {alpha!r}",
        )
        self.path = Path(path)
        self.capacity, self.policy, self.alpha, self.seed = capacity, policy, float(alpha), seed
        self.readonly = readonly
        self._conn: sqlite3.Connection | None = None
        self._connect()
        self._load_state()

    @classmethod
    def open(
        cls, path: str | Path, *, readonly: bool = False, seed: int | None = None
    ) -> ReplayBuffer:
        """Reopen an existing buffer with the capacity, policy and alpha stored in it."""
        _check(Path(path).is_file(), f"ReplayBuffer.open: no buffer file at {str(path)!r}")
        conn = sqlite3.connect(f"file:{Path(path).resolve()}?mode=ro", uri=True)
        try:
            config = json.loads(
                conn.execute("SELECT value FROM meta WHERE key='config'").fetchone()[0]
            )
        except (sqlite3.DatabaseError, TypeError) as err:
            raise ValueError(
                f"ReplayBuffer.open: {str(path)!r} is not a replay buffer ({err})"
            ) from None
        finally:
            conn.close()
        return cls(
            path,
            config["capacity"],
            config["policy"],
            config["seed"] if seed is None else seed,
            config["alpha"],
            readonly=readonly,
        )

    # ----------------------------------------------------------------- open / state
    def _connect(self) -> None:
        try:
            self._open_connection()
        except sqlite3.DatabaseError as err:
            raise ValueError(
                f"ReplayBuffer: cannot open {str(self.path)!r} as a SQLite replay buffer ({err}); "
                "check the path, its directory and its permissions"
            ) from None

    def _open_connection(self) -> None:
        if self.readonly:
            _check(
                self.path.is_file(),
                f"ReplayBuffer: readonly needs an existing file at {str(self.path)!r}",
            )
            conn = sqlite3.connect(
                f"file:{self.path.resolve()}?mode=ro", uri=True, isolation_level=None
            )
        else:
            # We issue BEGIN/COMMIT ourselves; a short timeout so a second writer fails fast.
            conn = sqlite3.connect(self.path, isolation_level=None, timeout=0.2)
            conn.execute("PRAGMA journal_mode=WAL")
            # A commit must survive power loss: the trainer deletes older checkpoints after it.
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA journal_size_limit=67108864")  # truncate the WAL after checkpoints
            conn.executescript(_SCHEMA)
        conn.execute("PRAGMA cache_size=-65536")  # 64 MiB page cache
        self._conn = conn

    def _config(self) -> dict:
        return {"schema": SCHEMA_VERSION, "capacity": self.capacity, "policy": self.policy,
                "alpha": self.alpha, "seed": self.seed}  # fmt: skip

    def _load_state(self) -> None:
        """Read config/state from meta (or initialise a new file) and rebuild the trees.

        A writer is left inside its open transaction; a reader reads one snapshot.
        """
        conn = self._conn
        try:
            self._begin()
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            if "config" not in meta:
                _check(
                    not self.readonly,
                    f"ReplayBuffer: {str(self.path)!r} is not a replay buffer yet",
                )
                init = _state(None, np.random.default_rng(self.seed), dict.fromkeys(_COUNTERS, 0))
                meta = {"config": json.dumps(self._config()), "state": json.dumps(init)}
                conn.executemany("INSERT INTO meta VALUES (?, ?)", meta.items())
                conn.execute("COMMIT")  # an empty buffer is a valid, reopenable file
                self._begin()
            stored = json.loads(meta["config"])
            for key in ("capacity", "policy", "alpha") + (() if self.readonly else ("seed",)):
                _check(
                    stored[key] == getattr(self, key),
                    f"ReplayBuffer: {key}={getattr(self, key)!r} but {str(self.path)!r} was created "
                    f"with {key}={stored[key]!r}; pass the stored value or use ReplayBuffer.open(path)",
                )
            self._set_state(json.loads(meta["state"]))
            if self.readonly:
                conn.execute("COMMIT")
        except BaseException:
            conn.close()
            self._conn = None
            raise

    def _begin(self) -> None:
        if self.readonly:
            self._conn.execute("BEGIN")
            return
        # BEGIN IMMEDIATE takes the write lock now: a second writer fails at open, not mid-run.
        try:
            self._conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as err:
            raise ValueError(
                f"ReplayBuffer: {str(self.path)!r} is open for writing elsewhere ({err}); "
                "close that writer or open with readonly=True"
            ) from None

    def _set_state(self, state: dict) -> None:
        """Adopt a committed state: counters, RNG (writer only), size, trees."""
        self._committed_step: int | None = state["step"]
        sampled = getattr(self, "_counters", {}).get("sampled", 0)
        self._counters = {k: int(state["counters"][k]) for k in _COUNTERS}
        self._rng = getattr(self, "_rng", None) or np.random.default_rng(self.seed)
        if self.readonly:
            self._counters["sampled"] = sampled  # a reader counts its own draws
        else:
            self._rng.bit_generator.state = state["rng"]
        self._size = self._counters["added"] - self._counters["evicted"]
        self._policy = REPLAY_POLICIES.get(self.policy)(self.capacity, self.alpha)
        if self._policy.scored:
            got = self._conn.execute("SELECT slot, last_score FROM rows").fetchall()
            data = np.array(got, dtype=np.float64).reshape(-1, 2)  # (n, 2)
            self._policy.load(data[:, 0].astype(np.int64), data[:, 1])

    def refresh(self) -> None:
        """Read-only buffers: pick up the rows and state committed since open (or last refresh)."""
        _check(
            self.readonly,
            "ReplayBuffer.refresh: only for readonly buffers; a writer is always current",
        )
        self._conn.execute("BEGIN")
        try:
            self._set_state(
                json.loads(
                    self._conn.execute("SELECT value FROM meta WHERE key='state'").fetchone()[0]
                )
            )
        finally:
            self._conn.execute("COMMIT")

    # ----------------------------------------------------------------- public API
    @property
    def committed_step(self) -> int | None:
        """Step passed to the last :meth:`commit` (None if never committed)."""
        return self._committed_step

    @property
    def size_bytes(self) -> int:
        """Bytes on disk: database plus its WAL (which holds not-yet-checkpointed pages)."""
        files = [self.path, Path(f"{self.path}-wal")]
        return sum(p.stat().st_size for p in files if p.exists())

    def __len__(self) -> int:
        return self._size

    def counters(self) -> dict[str, int]:
        """Counts since creation: offered, added, evicted, sampled, score_updates."""
        return dict(self._counters)

    def _writable(self, what: str) -> sqlite3.Connection:
        _check(self._conn is not None, f"ReplayBuffer.{what}: buffer {str(self.path)!r} is closed")
        _check(not self.readonly, f"ReplayBuffer.{what}: buffer {str(self.path)!r} is read-only")
        return self._conn

    def add(self, items: Sequence[BufferItem], scores: Sequence[float], step: int) -> int:
        """Offer items (with their current scores) seen at trainer ``step``.

        Returns how many were stored (an item stored and then replaced by a later item of
        the same call still counts). Nothing is durable until :meth:`commit`.
        """
        conn = self._writable("add")
        vals = _scores(f"ReplayBuffer.add: got {len(items)} items but", len(items), scores, "item")
        _check(
            _is_count(step),
            f"ReplayBuffer.add: step must be an int >= 0, got {step!r}",
        )
        rows, payloads = [], []
        pending: list[int] = []  # rows written but not yet in the policy's score index
        c = self._counters
        for item, score in zip(items, vals.tolist(), strict=True):
            _check(
                isinstance(item, BufferItem),
                f"ReplayBuffer.add: items must be BufferItem, got {type(item).__name__}",
            )
            c["offered"] += 1  # algorithm R's count of items seen, this one included
            if self._size < self.capacity:
                slot, self._size = self._size, self._size + 1
            else:
                j = int(self._rng.integers(c["offered"]))
                if j >= self.capacity:  # dropped w.p. 1 - capacity / offered
                    continue
                c["evicted"] += 1
                self._index_rows(pending, rows)  # a scored victim needs a current index
                slot = self._policy.victim(j)
            pending.append(len(rows))
            rows.append((slot, c["added"], item.doc_id, int(item.offset), int(step), score))
            mask = None if item.loss_mask is None else np.packbits(item.loss_mask).tobytes()
            payloads.append((slot, item.input_ids.tobytes(), mask))
            c["added"] += 1
        self._index_rows(pending, rows)
        if rows:
            conn.executemany("INSERT OR REPLACE INTO rows VALUES (?, ?, ?, ?, ?, ?, 0)", rows)
            conn.executemany("INSERT OR REPLACE INTO payload VALUES (?, ?, ?)", payloads)
        return len(rows)

    def _index_rows(self, pending: list[int], rows: list[tuple]) -> None:
        """Give a scored policy the pending new rows (indices into ``rows``)."""
        if self._policy.scored and pending:
            slots = np.array([rows[i][0] for i in pending])
            score = np.array([rows[i][5] for i in pending])
            self._policy.scores_changed(slots, score)
        pending.clear()

    def sample(self, k: int) -> list[BufferRow]:
        """Draw ``min(k, len(self))`` distinct rows; a writer increments their ``times_replayed``.

        ``reservoir`` (and ``priority`` when ``k >= len``) draws uniformly; rows come back
        in draw order, ``times_replayed`` counting this draw.
        """
        _check(self._conn is not None, f"ReplayBuffer.sample: buffer {str(self.path)!r} is closed")
        _check(_is_count(k), f"ReplayBuffer.sample: k must be an int >= 0, got {k!r}")
        k = min(int(k), self._size)
        if k == 0:
            return []
        slots = self._policy.draw(self._rng, self._size, k)
        marks = ",".join("?" * k)
        if not self.readonly:
            self._conn.execute(
                f"UPDATE rows SET times_replayed = times_replayed + 1 WHERE slot IN ({marks})",
                slots,
            )
        got = self._conn.execute(
            f"SELECT {_ROW_COLS}, p.input_ids, p.loss_mask FROM rows r "
            f"JOIN payload p ON p.slot = r.slot WHERE r.slot IN ({marks})",
            slots,
        ).fetchall()
        by_slot = {g[0]: g for g in got}
        self._counters["sampled"] += k
        return [_to_row(by_slot[s]) for s in slots]

    def update_scores(self, row_ids: Sequence[int], scores: Sequence[float]) -> None:
        """Refresh last scores (e.g. losses under the current model); evicted ids are skipped."""
        conn = self._writable("update_scores")
        ids = [int(r) for r in row_ids]
        vals = _scores(
            f"ReplayBuffer.update_scores: got {len(ids)} row_ids but", len(ids), scores, "row"
        )
        if not ids:
            return
        latest = dict(zip(ids, vals.tolist(), strict=True))  # a repeated id keeps its last score
        marks = ",".join("?" * len(latest))
        found = conn.execute(
            f"SELECT slot, row_id FROM rows WHERE row_id IN ({marks})", list(latest)
        ).fetchall()
        pairs = [(latest[row_id], slot) for slot, row_id in found]
        conn.executemany("UPDATE rows SET last_score = ? WHERE slot = ?", pairs)
        if self._policy.scored and pairs:
            new = np.array([p[0] for p in pairs])
            self._policy.scores_changed(np.array([p[1] for p in pairs]), new)
        self._counters["score_updates"] += len(pairs)

    def commit(self, step: int) -> None:
        """Make everything since the last commit durable, tagged with checkpoint ``step``."""
        conn = self._writable("commit")
        _check(
            _is_count(step),
            f"ReplayBuffer.commit: step must be an int >= 0, got {step!r}",
        )
        step = int(step)
        state = _state(step, self._rng, self._counters)
        conn.execute("INSERT OR REPLACE INTO meta VALUES ('state', ?)", (json.dumps(state),))
        conn.execute("COMMIT")
        self._committed_step = step
        conn.execute("BEGIN IMMEDIATE")

    def close(self) -> None:
        """Close the file. UNCOMMITTED CHANGES ARE DISCARDED: call :meth:`commit` first."""
        if self._conn is not None:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            self._conn.close()
            self._conn = None

    def __enter__(self) -> ReplayBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"ReplayBuffer({os.fspath(self.path)!r}, capacity={self.capacity}, policy={self.policy!r}, "
                f"len={self._size}, committed_step={self._committed_step})")  # fmt: skip


def _state(step: int | None, rng: np.random.Generator, counters: dict[str, int]) -> dict:
    """The buffer's own resumable state ('offered' is algorithm R's count of items seen)."""
    return {"step": step, "rng": rng.bit_generator.state, "counters": dict(counters)}


def _scores(prefix: str, n: int, scores: Sequence[float], per: str) -> np.ndarray:
    """Scores as float64, checked: one per ``per`` and all finite."""
    vals = np.asarray(scores, dtype=np.float64).reshape(-1)
    _check(len(vals) == n, f"{prefix} {len(vals)} scores; pass one score per {per}")
    _check(
        bool(np.isfinite(vals).all()),
        f"{prefix.split(':')[0]}: scores must be finite; drop or fix NaN/inf losses first",
    )
    return vals


def _to_row(rec: tuple) -> BufferRow:
    _, row_id, doc_id, offset, step, score, times, ids_blob, mask_blob = rec
    ids = np.frombuffer(ids_blob, dtype=np.int32).copy()
    mask = (
        None
        if mask_blob is None
        else np.unpackbits(np.frombuffer(mask_blob, dtype=np.uint8), count=len(ids)).astype(bool)
    )
    return BufferRow(doc_id=doc_id, offset=offset, input_ids=ids, loss_mask=mask, row_id=row_id,
                     step_first_seen=step, last_score=score, times_replayed=times)  # fmt: skip
