"""The run's state registry: every component that must survive a crash registers here once.

A component is anything with `state_dict()` / `load_state_dict(state)` (the buffer's rows and the
adapters' weights have their own files; everything else of a run is here). Checkpoints, unit
snapshots, rollback and the cross-rank digest iterate over the registry, so a new component is
one `register` call in `run.build.register_components`:

    registry.register("detector", detector)                    # checkpointed
    registry.register("protection", protection, snapshot=True, digest=True)

- `snapshot`: also saved when a knowledge unit closes (`units/<id>/trainer.pt`) and restored by
  `herllm rollback`, with the adapters of that moment;
- `per_rank`: each rank's own under N processes (its stream position's companions: pending
  windows, RNG, end-of-shard flag), saved under `ranks[r]` as well;
- `digest`: the ranks must agree on it; every checkpoint compares a hash of it across ranks;
- `required`: a checkpoint without it is refused in one line (False: the component keeps its
  fresh state, for entries that older checkpoints did not have).

A saved None (a component the saving run did not have) is not loaded, unless the component says
`loads_none = True`.

Entries load in registration order, so one that others depend on (the adapters before the
optimizer over them) registers first. The checkpoint keeps one flat key per entry, which is the
layout `trainer.pt` has had since round 1: older checkpoints load unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from herllm.errors import UserError

FORMAT = 2
"""`trainer.pt` layout version (1: before the registry; the same keys, without `format`)."""


class Stateful(Protocol):
    def state_dict(self) -> Any: ...
    def load_state_dict(self, state: Any) -> None: ...


class Field:
    """A plain attribute of an object as a registry component (a counter, a flag, a list)."""

    loads_none = True  # a saved None (e.g. no evaluation yet) is a value like any other

    def __init__(
        self,
        owner: object,
        attr: str,
        save: Callable[[Any], Any] = lambda v: v,
        load: Callable[[Any], Any] = lambda v: v,
    ) -> None:
        self.owner, self.attr, self.save, self.load = owner, attr, save, load

    def state_dict(self) -> Any:
        return self.save(getattr(self.owner, self.attr))

    def load_state_dict(self, state: Any) -> None:
        setattr(self.owner, self.attr, self.load(state))


@dataclass
class Entry:
    name: str
    component: Stateful | None
    snapshot: bool = False
    per_rank: bool = False
    digest: bool = False
    required: bool = True


class StateRegistry:
    """Named components of a run, in load order (see module doc)."""

    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}

    def register(
        self,
        name: str,
        component: Stateful | None,
        *,
        snapshot: bool = False,
        per_rank: bool = False,
        digest: bool = False,
        required: bool = True,
    ) -> None:
        """Register `component` under `name`; None: the run has no such component (its key is
        saved as None, and a saved state for it is ignored on load)."""
        if name in self.entries or name in ("format", "ranks"):
            raise ValueError(f"state component {name!r} is registered twice (or reserved)")
        self.entries[name] = Entry(name, component, snapshot, per_rank, digest, required)

    def replace(self, name: str, component: Stateful | None) -> None:
        """Point an entry at a new object (e.g. an adapter bank rebuilt from a checkpoint)."""
        self.entries[name].component = component

    def names(self, **flags: bool) -> list[str]:
        """Entry names, optionally those whose flags match (`names(snapshot=True)`)."""
        return [
            e.name
            for e in self.entries.values()
            if all(getattr(e, k) == v for k, v in flags.items())
        ]

    def state_dict(self, names: list[str] | None = None) -> dict[str, Any]:
        """Every entry's state (or those named), keyed by name; None for absent components.
        Every rank calls it: an entry's `state_dict` may be a collective (DeepSpeed)."""
        out: dict[str, Any] = {}
        for name in names if names is not None else self.entries:
            c = self.entries[name].component
            out[name] = c.state_dict() if c is not None else None
        return out

    def load_state_dict(self, state: dict[str, Any], where: str = "checkpoint") -> None:
        """Load every entry from `state`, in registration order (see module doc)."""
        if state.get("format", 1) > FORMAT:
            raise UserError(
                f"{where} was written by a newer herllm (format {state['format']}, this one "
                f"reads up to {FORMAT}); upgrade herllm to resume it"
            )
        for e in self.entries.values():
            if e.name not in state:
                if e.required:
                    raise UserError(
                        f"{where} has no {e.name!r} state (written by an older herllm, before "
                        f"that component existed); resume it with the herllm that wrote it, or "
                        "start a new run"
                    )
                continue
            if e.component is None:
                continue
            if state[e.name] is not None or getattr(e.component, "loads_none", False):
                e.component.load_state_dict(state[e.name])
