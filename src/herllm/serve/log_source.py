"""The interaction log as a followed source: the learner's side of `herllm.serve.log`.

`herllm adapt --follow RUN_DIR` (or `herllm serve RUN_DIR --learn`, which starts it) follows
`RUN_DIR/interactions.sqlite` through the same loop as any other stream. Each new trainable
exchange is one Document: ``text`` = the conversation as the model saw it (chat template
rendered, or ``role: content`` lines; retrieved facts left out, so what was answered with the
store's help is learned without it), ``response`` = the answer, or the user's correction (the
loss covers the response only). A thumbs-down answer without a correction is skipped.

An exchange counts once it has feedback or is `stream.follow_settle` seconds old (the time a
user has to give feedback that changes the target). Rows are taken in log order and the
decision for each is written back to the row the first time it is read (`learn`, `target`),
so the documents and their ids are the same on every read: a resumed learner's cursor stays
valid. While the server reports requests in flight (`serve-inflight.json`) the source waits,
and the learner holds its next step (`FollowedSources.busy`) until the server has been idle
for `QUIET_S`, so on a small machine the learner reads, scores and trains only in the pauses
between requests.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

from herllm.acquire.follow import FollowedSources, register_followed_kind
from herllm.acquire.sources import Document
from herllm.serve.log import LOG_FILE, connect, server_busy

INFLIGHT_FILE = "serve-inflight.json"
BUSY_POLL = 0.05
QUIET_S = 0.5
"""The learner starts a step only when no request has been in flight for this long: a client's
next request usually follows its last within it, and a step started in that gap would share the
cores with the request."""


def is_interaction_log(path: Path) -> bool:
    return path.name == LOG_FILE and path.is_file()


class LogSource:
    """New trainable exchanges of an interaction log, in log order (see module doc)."""

    def __init__(self, path: str | Path, settle: float = 0.0, busy_file: Path | None = None):
        self.path = Path(path)
        self.settle = settle
        self.busy_file = busy_file if busy_file is not None else self.path.parent / INFLIGHT_FILE
        self.conn = connect(self.path)
        self.pos = 0  # the last seq handed out or skipped
        self.waited = 0.0
        """Seconds spent waiting for the server to finish its requests."""

    def wait_for_server(self) -> None:
        start = time.monotonic()
        while server_busy(self.busy_file, QUIET_S):
            time.sleep(BUSY_POLL)
        self.waited += time.monotonic() - start

    def poll(self) -> Iterator[Document]:
        self.wait_for_server()
        self.freeze_settled()
        rows = self.conn.execute(
            "SELECT seq, id, prompt, target, learn FROM exchanges "
            "WHERE seq > ? AND learn IS NOT NULL ORDER BY seq",
            (self.pos,),
        ).fetchall()
        for seq, ex_id, prompt, target, learn in rows:
            self.pos = seq
            if learn == "train":
                if prompt.endswith(":") and not target[:1].isspace():
                    target = " " + target  # a plain-text prompt ends "assistant:"
                yield Document(f"{LOG_FILE}#{ex_id}", prompt, target)

    def freeze_settled(self, now: float | None = None) -> int:
        """Decide (train / skip, and the target) for the settled rows not yet decided, in log
        order up to the first unsettled one; returns how many were decided."""
        now = time.time() if now is None else now
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            rows = self.conn.execute(
                "SELECT seq, created, answer, rating, correction FROM exchanges "
                "WHERE learn IS NULL ORDER BY seq"
            ).fetchall()
            decided = []
            for seq, created, answer, rating, correction in rows:
                has_feedback = rating is not None or correction is not None
                if not has_feedback and created + self.settle > now:
                    break  # later rows wait too: the order of documents never changes
                decided.append((seq, *decide(answer, rating, correction)))
            self.conn.executemany(
                "UPDATE exchanges SET learn = ?, target = ? WHERE seq = ?",
                [(learn, target, seq) for seq, learn, target in decided],
            )
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")
        return len(decided)


def decide(answer: str, rating: str | None, correction: str | None) -> tuple[str, str | None]:
    """A correction is the target; a thumbs-down answer without one is not trained on."""
    if correction is not None and correction.strip():
        return "train", correction
    if rating == "down" or not answer.strip():
        return "skip", None
    return "train", answer


def _open_poll(path: Path, followed: FollowedSources):
    return LogSource(path, settle=followed.settle).poll


def _busy(path: Path):
    """The learner holds each step while the server has requests in flight."""
    busy_file = path.parent / INFLIGHT_FILE
    return lambda: server_busy(busy_file, QUIET_S)


register_followed_kind(is_interaction_log, _open_poll, _busy)
