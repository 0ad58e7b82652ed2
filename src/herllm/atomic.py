"""Atomic checkpoints tied to the replay buffer's commits.

Protocol (a crash at any point leaves a consistent pair of checkpoint and buffer):
1. write everything into `checkpoints/.tmp-step-N/`, fsync every file;
2. rename it to `checkpoints/step-N/` and fsync the directory (atomic on POSIX);
3. commit the replay buffer's open transaction with `step = N` (rows added since the last
   commit become durable together with the checkpoint that saw them);
4. delete checkpoints older than the `keep` newest.

On resume the buffer's committed step names the checkpoint to load. A checkpoint newer than
that (a crash between steps 2 and 3) never reached the buffer and is deleted, so the run
continues from the older one and nothing is learned twice.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from herllm.errors import UserError

PREFIX = "step-"


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:07d}"


def list_checkpoints(ckpt_root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (renamed dirs), oldest first."""
    if not ckpt_root.is_dir():
        return []
    out = []
    for p in ckpt_root.iterdir():
        if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX) :].isdigit():
            out.append((int(p.name[len(PREFIX) :]), p))
    return sorted(out)


def fsync_tree(path: Path) -> None:
    """fsync every file under path, then the directories themselves."""
    for root, _dirs, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(Path(root))


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def begin(ckpt_root: Path, step: int) -> Path:
    """Fresh temporary directory for checkpoint `step`."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    tmp = ckpt_root / f".tmp-{checkpoint_name(step)}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def publish(tmp: Path) -> Path:
    """fsync and atomically rename the temporary directory into place."""
    fsync_tree(tmp)
    final = tmp.parent / tmp.name.removeprefix(".tmp-")
    if final.exists():  # a stale copy from a run that crashed before committing it
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_dir(tmp.parent)
    return final


def prune(ckpt_root: Path, keep: int, committed: int | None) -> None:
    """Keep the `keep` newest committed checkpoints; remove temporaries and uncommitted ones."""
    for p in ckpt_root.glob(".tmp-*"):
        shutil.rmtree(p, ignore_errors=True)
    ckpts = list_checkpoints(ckpt_root)
    if committed is not None:
        for step, p in ckpts:
            if step > committed:
                shutil.rmtree(p)
        ckpts = [(s, p) for s, p in ckpts if s <= committed]
    for _step, p in ckpts[:-keep]:
        shutil.rmtree(p)


def resume_point(ckpt_root: Path, committed: int | None) -> Path | None:
    """The checkpoint to resume from: the buffer's committed step, else the newest one."""
    prune(ckpt_root, keep=10**9, committed=committed)
    ckpts = dict(list_checkpoints(ckpt_root))
    if committed is not None:
        if committed not in ckpts:
            raise UserError(
                f"the replay buffer was committed at step {committed} but "
                f"{ckpt_root / checkpoint_name(committed)} is missing; the run directory was "
                "edited by hand; restore that checkpoint or start a new run"
            )
        return ckpts[committed]
    return ckpts[max(ckpts)] if ckpts else None


def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
