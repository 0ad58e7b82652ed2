"""The regularizer registry: every forgetting-protection penalty, by the name config uses.

A regularizer class registers itself where it is defined::

    @register_regularizer("kl", config={"reference": "kl_reference"})
    class KLAnchor: ...

``config`` maps constructor arguments to `ProtectConfig` fields, so builders never branch on a
name; ``needs_full_grads`` says the method reads each step's whole gradient after the optimizer
step (SI), which a sharded optimizer must then keep. The built-in methods register when
`herllm.update.regularizers` is imported (`update.protection` and the config's check of
`protect.regularizers` import it); importing this module alone does not import torch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from herllm.registry import Registry


@dataclass(frozen=True)
class RegularizerEntry:
    name: str
    cls: type
    config: Mapping[str, str] = field(default_factory=dict)
    """Constructor argument -> `ProtectConfig` field it is read from."""
    needs_full_grads: bool = False
    """Reads every parameter's gradient in `after_step` (SI's path integral)."""

    def build(self, cfg: Any) -> Any:
        """An instance configured from `cfg` (a `ProtectConfig`)."""
        return self.cls(**{arg: getattr(cfg, name) for arg, name in self.config.items()})


REGULARIZERS: Registry[RegularizerEntry] = Registry("regularizer")


def register_regularizer(
    name: str, *, config: Mapping[str, str] | None = None, needs_full_grads: bool = False
) -> Callable[[type], type]:
    """Class decorator: register a `Regularizer` as `name` (the value of protect.regularizers)."""

    def deco(cls: type) -> type:
        REGULARIZERS.add(name, RegularizerEntry(name, cls, dict(config or {}), needs_full_grads))
        return cls

    return deco


def regularizer_names() -> tuple[str, ...]:
    """Every registered regularizer name, in registration order."""
    return REGULARIZERS.names()


def build_regularizer(name: str, cfg: Any) -> Any:
    """The regularizer registered as `name`, configured from `cfg` (a `ProtectConfig`)."""
    return REGULARIZERS.get(name).build(cfg)


def needs_full_grads(names: Iterable[str]) -> bool:
    """True when a regularizer among `names` reads whole gradients after the step (SI)."""
    return any(REGULARIZERS.get(n).needs_full_grads for n in names)
