"""Experience refinement, part 2: which new experiences to spend an update on.

`AllSelector` trains on everything (the control). `UncertainSelector` trains on the experiences
the model knows least: those whose loss is at or above the running (1 - fraction) quantile of
recent scores. The threshold moves with the stream, so a batch the model already knows well
costs one no-grad pass and no update, while a new region (whose losses jump above the recent
quantile) is learned in full until the model catches up. Skipped experiences still enter the
replay buffer, so nothing seen is forgotten by the memory.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np

from herllm.registry import Registry


@dataclass(frozen=True)
class SelectorEntry:
    name: str
    cls: type
    config: Mapping[str, str] = field(default_factory=dict)
    """Constructor argument -> `SelectConfig` field it is read from."""

    def build(self, cfg: Any) -> Any:
        """An instance configured from `cfg` (a `SelectConfig` or anything with its fields)."""
        return self.cls(**{arg: getattr(cfg, name) for arg, name in self.config.items()})


SELECTORS: Registry[SelectorEntry] = Registry("selector")


def register_selector(
    name: str, *, config: Mapping[str, str] | None = None
) -> Callable[[type], type]:
    """Class decorator: register a selector (``select(nll) -> bool mask``, ``state_dict``,
    ``load_state_dict``) as `name`, the value of select.policy."""

    def deco(cls: type) -> type:
        SELECTORS.add(name, SelectorEntry(name, cls, dict(config or {})))
        return cls

    return deco


def selector_names() -> tuple[str, ...]:
    """Every registered selector name (the choices of select.policy), in registration order."""
    return SELECTORS.names()


@register_selector("all")
class AllSelector:
    """Select every experience."""

    def select(self, nll: np.ndarray) -> np.ndarray:
        return np.ones(len(nll), dtype=bool)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


@register_selector(
    "uncertain", config={"fraction": "fraction", "window": "window", "warmup": "warmup"}
)
class UncertainSelector:
    """Select experiences whose NLL is in the top `fraction` of the last `window` scores."""

    def __init__(self, fraction: float = 0.5, window: int = 512, warmup: int = 64):
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction={fraction} must be in (0, 1]")
        self.fraction = fraction
        self.warmup = warmup
        self.recent: deque[float] = deque(maxlen=window)
        self.seen = 0

    def select(self, nll: np.ndarray) -> np.ndarray:
        nll = np.asarray(nll, dtype=np.float64)
        if self.seen < self.warmup or len(self.recent) == 0:
            chosen = np.ones(len(nll), dtype=bool)
        else:
            threshold = np.quantile(np.fromiter(self.recent, float), 1.0 - self.fraction)
            chosen = nll >= threshold
        self.recent.extend(nll.tolist())
        self.seen += len(nll)
        return chosen

    def state_dict(self) -> dict:
        return {"recent": list(self.recent), "seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        self.recent.clear()
        self.recent.extend(state["recent"])
        self.seen = state["seen"]


def selector_from_config(cfg: Any):
    """The selector registered as ``cfg.policy``, with the select.* values it reads."""
    if cfg.policy not in SELECTORS:
        raise ValueError(
            f"select.policy={cfg.policy!r} is not allowed; choose one of {', '.join(SELECTORS)}"
        )
    return SELECTORS.get(cfg.policy).build(cfg)


def build_selector(policy: str, fraction: float, window: int, warmup: int):
    """`selector_from_config` with the select.* values given one by one."""
    return selector_from_config(
        SimpleNamespace(policy=policy, fraction=fraction, window=window, warmup=warmup)
    )
