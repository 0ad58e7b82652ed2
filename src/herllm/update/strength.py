"""Dynamic strength of the protection penalties: a set share of the LM loss, adapted online."""

from __future__ import annotations

import math

from torch import Tensor

from herllm.update.params import _check_kind


class DynamicStrength:
    """Penalty weights that keep ``w * penalty ~= ratio * lm_loss``, with ``ratio`` set online.

    ``weight(name, penalty, lm_loss)`` tracks EMAs of both magnitudes and returns
    ``ratio * ema(lm_loss) / ema(penalty)`` (capped at ``max_weight``), so one setting works across
    model sizes and importance scales. Each named penalty gets the same ``ratio``.
    Caveat: right after a consolidation the penalty is tiny and its weight large; the effect is a
    trust region whose radius shrinks with ``ratio`` (the EMA and the cap keep it smooth).

    ``observe(old_loss_delta, new_loss_progress)`` adapts ``ratio`` from stability signals, in
    nats since the previous call: forgetting (held-out loss on earlier units rose by more than
    ``forget_tolerance``) multiplies it by ``1 + adapt_rate``; otherwise a new region not being
    learned (progress <= ``progress_tolerance``) divides it. Forgetting wins when both happen.
    """

    def __init__(
        self,
        target_ratio: float = 0.1,
        decay: float = 0.99,
        min_ratio: float = 0.01,
        max_ratio: float = 1.0,
        adapt_rate: float = 0.25,
        forget_tolerance: float = 0.01,
        progress_tolerance: float = 0.0,
        max_weight: float = 1e8,
    ) -> None:
        if not 0 < min_ratio <= target_ratio <= max_ratio:
            raise ValueError(
                f"DynamicStrength needs 0 < min_ratio <= target_ratio <= max_ratio, got "
                f"{min_ratio}, {target_ratio}, {max_ratio}"
            )
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"DynamicStrength decay={decay} is outside [0, 1); try 0.99")
        self.ratio = target_ratio
        self.decay = decay
        self.min_ratio, self.max_ratio = min_ratio, max_ratio
        self.adapt_rate = adapt_rate
        self.forget_tolerance = forget_tolerance
        self.progress_tolerance = progress_tolerance
        self.max_weight = max_weight
        self.lm_ema: dict[str, float] = {}  # per name: each pair is updated once per step
        self.penalty_ema: dict[str, float] = {}

    def _ema(self, old: float | None, new: float) -> float:
        return new if old is None else self.decay * old + (1.0 - self.decay) * new

    def weight(self, name: str, penalty: Tensor | float, lm_loss: Tensor | float) -> float:
        """Update the EMAs with this step's magnitudes and return the weight for ``name``."""
        pen = float(penalty.detach()) if isinstance(penalty, Tensor) else float(penalty)
        lm = float(lm_loss.detach()) if isinstance(lm_loss, Tensor) else float(lm_loss)
        if not (math.isfinite(pen) and math.isfinite(lm)):
            raise ValueError(f"DynamicStrength.weight got penalty={pen}, lm_loss={lm} for {name!r}")
        if pen <= 0.0:  # zero before consolidation: nothing to scale yet
            return 0.0
        self.lm_ema[name] = self._ema(self.lm_ema.get(name), abs(lm))
        self.penalty_ema[name] = self._ema(self.penalty_ema.get(name), pen)
        return min(self.ratio * self.lm_ema[name] / self.penalty_ema[name], self.max_weight)

    def observe(self, old_loss_delta: float, new_loss_progress: float) -> float:
        """Raise ``ratio`` on forgetting, lower it when the new region stalls; returns it."""
        if old_loss_delta > self.forget_tolerance:
            self.ratio *= 1.0 + self.adapt_rate
        elif new_loss_progress <= self.progress_tolerance:
            self.ratio /= 1.0 + self.adapt_rate
        self.ratio = min(max(self.ratio, self.min_ratio), self.max_ratio)
        return self.ratio

    def state_dict(self) -> dict:
        return {
            "kind": "DynamicStrength",
            "ratio": self.ratio,
            "lm_ema": dict(self.lm_ema),
            "penalty_ema": dict(self.penalty_ema),
        }

    def load_state_dict(self, state: dict) -> None:
        _check_kind(self, state)
        self.ratio = float(state["ratio"])
        self.lm_ema = dict(state["lm_ema"])
        self.penalty_ema = dict(state["penalty_ema"])
