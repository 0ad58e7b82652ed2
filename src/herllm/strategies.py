"""Named strategies: data, not subclasses. Each is a set of config choices for the one loop.

A strategy names which selector, buffer policy and replay mix the loop uses (and, as the
protection and expansion work lands, which regularizers, meta-step and adapter policy). The
benchmark and `herllm adapt --strategy NAME` both read this table, so comparisons are fair:
every method runs through the same loop with the same model, data and budget.
"""

from __future__ import annotations

from dataclasses import dataclass

from herllm.errors import UserError


@dataclass(frozen=True)
class Strategy:
    name: str
    description: str
    overrides: tuple[str, ...] = ()
    """Config overrides (`section.key=value`) that define the strategy."""
    missing: str | None = None
    """Why the strategy cannot run yet; None when it is implemented."""


_SHIFT = ("shift.detect=true",)
_PLAIN = ("select.policy=all", "replay.ratio=0", "replay.capacity=0")

STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in (
        Strategy("naive", "fine-tune LoRA on the stream as it comes; no memory", _PLAIN),
        Strategy("replay", "naive + uniform (reservoir) replay of past experience, 25% of each batch",
                 ("select.policy=all", "replay.policy=reservoir", "replay.ratio=0.25")),
        Strategy("ewc", "online EWC (diagonal Fisher), consolidated at each detected shift",
                 (*_PLAIN, *_SHIFT, "protect.regularizers=[ewc]")),
        Strategy("mas", "memory-aware synapses (label-free importance), consolidated at each shift",
                 (*_PLAIN, *_SHIFT, "protect.regularizers=[mas]")),
        Strategy("si", "synaptic intelligence (path integral), consolidated at each shift",
                 (*_PLAIN, *_SHIFT, "protect.regularizers=[si]")),
        Strategy("lwf", "KL to the model at the last shift on the current batch (LwF)",
                 (*_PLAIN, *_SHIFT, "protect.regularizers=[kl]", "protect.kl_reference=last")),
        Strategy("mer", "reservoir replay + Reptile meta-experience replay",
                 ("select.policy=all", "replay.policy=reservoir", "replay.ratio=0.25",
                  "protect.reptile_every=50", "protect.reptile_epsilon=0.5")),
        Strategy("olora", "O-LoRA: a new LoRA adapter per far region, orthogonal to the frozen ones; "
                 "all adapters add up at inference", (*_PLAIN, *_SHIFT, "expand.grow=true", "expand.compose=sum")),
        Strategy("her", "uncertainty selection + priority replay + general replay + shift-triggered "
                 "MAS + a warm-started adapter per new region, routed without task ids",
                 ("select.policy=uncertain", "select.fraction=0.75", "replay.policy=priority",
                  "replay.ratio=0.125", "replay.general_ratio=0.125", "protect.regularizers=[mas]",
                  *_SHIFT, "expand.grow=true", "expand.init=current", "expand.orth_ratio=0")),
    )
}  # fmt: skip


def get_strategy(name: str) -> Strategy:
    if name not in STRATEGIES:
        raise UserError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
    return STRATEGIES[name]


def strategy_overrides(name: str) -> list[str]:
    """Config overrides for `name`; a strategy that cannot run yet is a clear error."""
    strategy = get_strategy(name)
    if strategy.missing:
        raise UserError(f"strategy {name!r} is not available yet: {strategy.missing}")
    return list(strategy.overrides)
