"""Atomic pretraining checkpoints: model, optimizer, RNG and data position in one directory.

The write protocol is the learner's (``herllm.atomic``): a temporary directory, every file
fsynced, an atomic rename to ``step-N``, the parent fsynced. A crash therefore leaves either
the old set of checkpoints or the old set plus one complete new one.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from herllm import atomic as ckpt


def save_checkpoint(root: Path, step: int, model: torch.nn.Module, opt: torch.optim.Optimizer,
                    history: list[dict], keep: int = 2) -> Path:  # fmt: skip
    """Write ``root/step-N`` atomically (see herllm.atomic); delete all but the newest ``keep``."""
    tmp = ckpt.begin(root, step)
    # tied embeddings share storage: safetensors refuses shared tensors, so store clones
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(state, tmp / "model.safetensors")
    trainer = {
        "step": step,  # the data position: batch index into the seeded order
        "optimizer": opt.state_dict(),
        "history": history,
        "rng": ckpt.rng_state(),
    }
    torch.save(trainer, tmp / "trainer.pt")
    final = ckpt.publish(tmp)
    ckpt.prune(root, keep, committed=None)
    return final


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under ``root`` (temp dirs are ignored), or None."""
    done = ckpt.list_checkpoints(root)
    return done[-1][1] if done else None


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
    ckpt.set_rng_state(trainer["rng"])
    return trainer["step"], trainer["history"]
