"""What the loop calls to protect earlier knowledge: regularizers, their strength, Reptile.

One object so the loop stays flat: `penalty` before backward, `after_backward`, `after_step`
around the optimizer step, `consolidate` at a detected shift, `observe` with stability signals.
Every part is one of the small objects of `regularizers.py` (built by name from
`registry.py`) / `meta.py`; this file only composes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from herllm.config import ProtectConfig
from herllm.update import regularizers  # noqa: F401  (the built-in methods register)
from herllm.update.meta import Reptile
from herllm.update.registry import build_regularizer
from herllm.update.strength import DynamicStrength


class Protection:
    def __init__(
        self,
        cfg: ProtectConfig,
        mean_over_ranks: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
    ):
        self.cfg = cfg
        self.mean_over_ranks = mean_over_ranks
        """On N processes: averages the magnitudes that set the weights, so every rank keeps the
        same strength state (the identity on one process)."""
        self.regs = {name: build_regularizer(name, cfg) for name in cfg.regularizers}
        self.strength = DynamicStrength(
            target_ratio=cfg.strength,
            min_ratio=min(0.01, cfg.strength),
            max_ratio=max(1.0, cfg.strength),
        )
        self.reptile = (
            Reptile(cfg.reptile_every, cfg.reptile_epsilon) if cfg.reptile_every > 0 else None
        )
        self.consolidations = 0
        self.last_terms: dict[str, float] = {}

    @property
    def active(self) -> bool:
        return bool(self.regs) or self.reptile is not None

    def start(self, model) -> None:
        """At the first step of a run: anchor Reptile; regularizers with a `start` (a
        base-anchored KL protects from step 0) get it."""
        if self.reptile is not None and self.reptile.anchor is None:
            self.reptile.attach(model)
        for reg in self.regs.values():
            start = getattr(reg, "start", None)
            if start is not None:
                start(model)

    def penalty(self, model, batch: dict, lm_loss: torch.Tensor) -> torch.Tensor:
        """Sum of weighted penalties; each weight keeps its term a set share of the LM loss."""
        total = lm_loss.new_zeros(())
        self.last_terms = {}
        # Terms are zero (no grad) before the first consolidation.
        terms = {n: p for n, p in ((n, r.penalty(model, batch)) for n, r in self.regs.items())
                 if p.requires_grad}  # fmt: skip
        if terms and self.cfg.dynamic:  # sizes (1 + terms,): LM loss, then each penalty
            sizes = self.mean_over_ranks(
                torch.stack(
                    [lm_loss.detach().float()] + [p.detach().float() for p in terms.values()]
                )
            )
        for i, (name, p) in enumerate(terms.items()):
            w = (
                self.strength.weight(name, sizes[i + 1], sizes[0])
                if self.cfg.dynamic
                else self.cfg.strength
            )
            total = total + w * p
            self.last_terms[name] = float(w * p.detach())
        return total

    def after_backward(self, model) -> None:
        for reg in self.regs.values():
            reg.after_backward(model)

    def after_step(self, model, optimizer) -> bool:
        """Regularizer bookkeeping, then a Reptile step when due; True if Reptile moved the weights."""
        for reg in self.regs.values():
            reg.after_step(model)
        return self.reptile.after_step(model, optimizer) if self.reptile is not None else False

    def consolidate(self, model, batches: Iterable[dict]) -> None:
        batches = list(batches)
        for reg in self.regs.values():
            reg.consolidate(model, batches)
        self.consolidations += 1

    def observe(self, old_loss_delta: float, new_loss_progress: float) -> float:
        return (
            self.strength.observe(old_loss_delta, new_loss_progress)
            if self.cfg.dynamic
            else self.cfg.strength
        )

    def state_dict(self) -> dict:
        return {
            "regs": {n: r.state_dict() for n, r in self.regs.items()},
            "strength": self.strength.state_dict(),
            "reptile": self.reptile.state_dict() if self.reptile is not None else None,
            "consolidations": self.consolidations,
        }

    def load_state_dict(self, state: dict) -> None:
        for name, reg in self.regs.items():
            reg.load_state_dict(state["regs"][name])
        self.strength.load_state_dict(state["strength"])
        if self.reptile is not None and state["reptile"] is not None:
            self.reptile.load_state_dict(state["reptile"])
        self.consolidations = state["consolidations"]


class StabilityTracker:
    """EMAs of the training loss on new and on replayed samples: the stability signals.

    `signals()` returns (rise of the replay loss, fall of the new-sample loss) since the last call:
    earlier knowledge being forgotten, and the new region being learned.
    """

    def __init__(self, decay: float = 0.9):
        self.decay = decay
        self.new: float | None = None
        self.old: float | None = None
        self.last: tuple[float | None, float | None] = (None, None)

    def update(self, new_loss: float, replay_loss: float | None) -> None:
        d = self.decay
        self.new = new_loss if self.new is None else d * self.new + (1 - d) * new_loss
        if replay_loss is not None:
            self.old = replay_loss if self.old is None else d * self.old + (1 - d) * replay_loss

    def signals(self, units_loss: float | None = None) -> tuple[float, float]:
        """(rise of the loss on earlier knowledge, fall of the new-sample loss) since the last call.

        `units_loss`, the loss on samples of earlier knowledge units, is the direct measure of
        forgetting; without closed units yet, the replay-loss EMA stands in for it.
        """
        old = units_loss if units_loss is not None else self.old
        last_old, last_new = self.last
        old_delta = (old - last_old) if old is not None and last_old is not None else 0.0
        progress = (last_new - self.new) if self.new is not None and last_new is not None else 0.0
        self.last = (old, self.new)
        return old_delta, progress

    def state_dict(self) -> dict:
        return {"new": self.new, "old": self.old, "last": self.last}

    def load_state_dict(self, state: dict) -> None:
        self.new, self.old, self.last = state["new"], state["old"], tuple(state["last"])
