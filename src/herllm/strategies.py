"""Named strategies: data, not subclasses. Each is a set of config choices for the one loop.

A strategy names which selector, buffer policy and replay mix the loop uses (and, as the
protection and expansion work lands, which regularizers, meta-step and adapter policy). The
benchmark and `herllm adapt --strategy NAME` both read this table, so comparisons are fair:
every method runs through the same loop with the same model, data and budget. A strategy
registers itself with `register_strategy`; the benchmark's rows follow registration order.
"""

from __future__ import annotations

from dataclasses import dataclass

from herllm.errors import UserError
from herllm.registry import Registry


@dataclass(frozen=True)
class Strategy:
    name: str
    description: str
    overrides: tuple[str, ...] = ()
    """Config overrides (`section.key=value`) that define the strategy."""
    missing: str | None = None
    """Why the strategy cannot run yet; None when it is implemented."""


REGISTRY: Registry[Strategy] = Registry("strategy", error=UserError)
STRATEGIES: dict[str, Strategy] = REGISTRY.entries
"""Every registered strategy by name, in registration order (the benchmark's row order)."""
REFERENCE = ("base", "joint", "hf-peft")
"""The benchmark's reference rows (the frozen base model, joint training, a plain transformers
Trainer + PEFT script trained sequentially with re-warming and replay): not strategies."""


def register_strategy(
    name: str, description: str, overrides: tuple[str, ...] = (), missing: str | None = None
) -> Strategy:
    """Register a named strategy: the config overrides that define it."""
    return REGISTRY.add(name, Strategy(name, description, tuple(overrides), missing))


def strategy_order() -> list[str]:
    """Rows of a benchmark report: the reference rows, then strategies in registration order."""
    return [*REFERENCE, *STRATEGIES]


_SHIFT = ("shift.detect=true",)
_PLAIN = ("select.policy=all", "replay.ratio=0", "replay.capacity=0")

register_strategy("naive", "fine-tune LoRA on the stream as it comes; no memory", _PLAIN)
register_strategy(
    "replay",
    "naive + uniform (reservoir) replay of past experience, 25% of each batch",
    ("select.policy=all", "replay.policy=reservoir", "replay.ratio=0.25"),
)
register_strategy(
    "ewc",
    "online EWC (diagonal Fisher), consolidated at each detected shift",
    (*_PLAIN, *_SHIFT, "protect.regularizers=[ewc]"),
)
register_strategy(
    "mas",
    "memory-aware synapses (label-free importance), consolidated at each shift",
    (*_PLAIN, *_SHIFT, "protect.regularizers=[mas]"),
)
register_strategy(
    "si",
    "synaptic intelligence (path integral), consolidated at each shift",
    (*_PLAIN, *_SHIFT, "protect.regularizers=[si]"),
)
register_strategy(
    "lwf",
    "KL to the model at the last shift on the current batch (LwF)",
    (*_PLAIN, *_SHIFT, "protect.regularizers=[kl]", "protect.kl_reference=last"),
)
register_strategy(
    "mer",
    "reservoir replay + Reptile meta-experience replay",
    (
        "select.policy=all",
        "replay.policy=reservoir",
        "replay.ratio=0.25",
        "protect.reptile_every=50",
        "protect.reptile_epsilon=0.5",
    ),
)
register_strategy(
    "olora",
    "O-LoRA: a new LoRA adapter per far region, orthogonal to the frozen "
    "ones; all adapters add up at inference",
    (*_PLAIN, *_SHIFT, "expand.grow=true", "expand.compose=sum"),
)
register_strategy("her", "uncertainty selection + priority replay + general replay (self-rehearsal on "
                  "chat models) + shift-triggered MAS + a warm-started adapter per new region, "
                  "routed without task ids",
                  ("select.policy=uncertain", "select.fraction=0.75", "replay.policy=priority",
                   "replay.ratio=0.125", "replay.general_ratio=0.125", "replay.rehearsal=chat",
                   "protect.regularizers=[mas]",
                   *_SHIFT, "expand.grow=true", "expand.init=current", "expand.orth_ratio=0"))  # fmt: skip
register_strategy("her-step", "her at lower cost: every window's scores from its training step (no "
                  "scoring pass, no selection), the detector on input embeddings, replay in place "
                  "of new rows (naive's tokens)",
                  (*STRATEGIES["her"].overrides, "select.policy=all", "select.scores=step",
                   "shift.reps=embed", "replay.mode=replace"))  # fmt: skip


def get_strategy(name: str) -> Strategy:
    """The strategy registered as `name`; an unknown name is one line naming the choices."""
    return REGISTRY.get(name)


def split_spec(spec: str) -> tuple[str, list[str]]:
    """A benchmark row's spec, `NAME` or `NAME:section.key=value[:...]` (a strategy at a setting
    other than its own), as the strategy's name and the extra overrides."""
    name, *extra = spec.split(":")
    bad = [e for e in extra if "=" not in e or e.startswith("=")]
    if bad:
        raise UserError(
            f"strategy {spec!r}: {bad[0]!r} is not section.key=value; write NAME or "
            "NAME:section.key=value (for example ewc:protect.strength=0.01)"
        )
    return name, extra


def strategy_overrides(name: str) -> list[str]:
    """Config overrides for `name`; a strategy that cannot run yet is a clear error."""
    strategy = get_strategy(name)
    if strategy.missing:
        raise UserError(f"strategy {name!r} is not available yet: {strategy.missing}")
    return list(strategy.overrides)
