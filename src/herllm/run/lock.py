"""One writer per run directory.

A learner holds `RUN/.learner.lock` (an exclusive `flock`) while it has the run open, and the
commands that write a run's checkpoints from outside it (`herllm rollback`, `herllm knowledge
consolidate --run` and `forget --run`) hold it while they write. Without it a second learner
resuming the same run would delete the first one's newest checkpoint as uncommitted, and a
learner left running would publish its own weights over a consolidation or a forget: work lost
without a word. The kernel drops the lock when its process ends, SIGKILL included, so a killed
run is free again at once. Where `fcntl` does not exist (Windows) nothing is locked.
"""

from __future__ import annotations

import os
from pathlib import Path

from herllm.errors import UserError

LOCK_FILE = ".learner.lock"


class RunLock:
    """The run directory's lock, taken on `acquire` (or entering a `with` block) without
    waiting: held elsewhere, it is one `UserError` naming the holder's pid and `fix`."""

    def __init__(self, run_dir: str | Path, fix: str):
        self.path = Path(run_dir) / LOCK_FILE
        self.fix = fix
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        try:
            import fcntl
        except ImportError:  # no flock on this platform
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if holder == str(os.getpid()):
                raise UserError(
                    f"run directory {self.path.parent} is held by an earlier Learner of this "
                    "process that was not closed; use `with Learner(...)` or call its close()"
                ) from None
            raise UserError(
                f"run directory {self.path.parent} is in use by another process (pid {holder}, a "
                f"learner or a command writing its checkpoints); {self.fix}"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None

    def __del__(self) -> None:
        self.release()

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def is_main_rank() -> bool:
    """Rank 0 of a torchrun launch, or a single process (the one that takes the lock)."""
    return int(os.environ.get("RANK", "0")) == 0


WRITER_FIX = (
    "stop the learner first: its next checkpoint would publish its own weights over this change "
    "(behind `herllm serve --learn`, POST /v1/admin/forget stops and restarts it itself)"
)
LEARNER_FIX = (
    "one learner per run directory: stop the other one, or give this one another --run-dir"
)


def holding_run(fn):
    """Decorator: `fn(run_dir, ...)` runs holding the run's lock (a command writing checkpoints)."""
    import functools

    @functools.wraps(fn)
    def wrapper(run_dir, *args, **kwargs):
        with RunLock(run_dir, WRITER_FIX):
            return fn(run_dir, *args, **kwargs)

    return wrapper
