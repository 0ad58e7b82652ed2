"""Registries by name, one per kind (regularizers, selectors, replay policies, strategies).

As PEFT's ``register_peft_method``: each method registers itself where it is defined, and
everything that lists, validates or builds methods of a kind reads that kind's registry, so adding
one touches its own module (and a test row). A registry holds what has been registered: whoever
reads one imports the module that defines its built-in entries first (never the other way round,
so there is no import cycle).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Entries of one kind by name, in registration order."""

    def __init__(self, kind: str, error: type[Exception] = ValueError) -> None:
        self.kind = kind
        self.entries: dict[str, T] = {}
        """The entries by name (a plain dict: tests may patch it)."""
        self._error = error

    def add(self, name: str, entry: T) -> T:
        """Register `entry` as `name`; a name registered twice is a programming error."""
        if name in self.entries:
            raise ValueError(f"{self.kind} {name!r} is already registered; pick another name")
        self.entries[name] = entry
        return entry

    def names(self) -> tuple[str, ...]:
        """Registered names, in registration order."""
        return tuple(self.entries)

    def get(self, name: str) -> T:
        """The entry registered as `name`; an unknown name is one line naming the choices."""
        entries = self.entries
        if name not in entries:
            raise self._error(f"unknown {self.kind} {name!r}; choose one of {', '.join(entries)}")
        return entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.entries)
