"""Atomic pretraining checkpoints: model, optimizer, RNG and data position in one directory.

A checkpoint is written to ``checkpoints/.tmp-step-N``, every file is fsynced,
then the directory is renamed to ``checkpoints/step-N`` (rename is atomic on
POSIX), and the parent directory is fsynced. A crash therefore leaves either
the old set of checkpoints or the old set plus one complete new one.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(root: Path, step: int, model: torch.nn.Module, opt: torch.optim.Optimizer,
                    history: list[dict], keep: int = 2) -> Path:  # fmt: skip
    """Write ``root/step-NNNNNN`` atomically; delete all but the newest ``keep``."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    # tied embeddings share storage: safetensors refuses shared tensors, so store clones
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(state, tmp / "model.safetensors")
    trainer = {
        "step": step,  # the data position: batch index into the seeded order
        "optimizer": opt.state_dict(),
        "history": history,
        "rng": {
            "torch": torch.get_rng_state(),
            "numpy": np.random.get_state(),
            "python": random.getstate(),
        },
    }
    torch.save(trainer, tmp / "trainer.pt")
    for f in tmp.iterdir():
        with open(f, "rb+") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(root)
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old)
    return final


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under ``root`` (temp dirs are ignored), or None."""
    done = sorted(p for p in root.glob("step-*") if (p / "trainer.pt").exists())
    return done[-1] if done else None


def load_checkpoint(
    path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer
) -> tuple[int, list]:
    """Restore model, optimizer and RNG from ``path``; return (step, eval history)."""
    missing, unexpected = model.load_state_dict(load_file(path / "model.safetensors"), strict=False)
    if unexpected or [m for m in missing if "lm_head" not in m]:
        raise ValueError(
            f"checkpoint {path} does not match the model config: missing={missing}, unexpected={unexpected}"
        )
    trainer = torch.load(path / "trainer.pt", weights_only=False)
    opt.load_state_dict(trainer["optimizer"])
    torch.set_rng_state(trainer["rng"]["torch"])
    np.random.set_state(trainer["rng"]["numpy"])
    random.setstate(trainer["rng"]["python"])
    return trainer["step"], trainer["history"]
