"""What a config field may hold, declared on the field: `Annotated[float, Range(gt=0)]`,
`Literal["a", "b"]`, or `Annotated[str, OneOf(names)]` for choices a registry owns.

`check_value` enforces them (from `from_dict` as each value is read, and from
`RunConfig.validate` over every field); each violation is one `ConfigError` line naming the field
path, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal, get_args, get_origin, get_type_hints

from herllm.errors import UserError


class ConfigError(UserError):
    """A user mistake in the configuration: one line, what/where/how to fix."""


def _num(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else str(bound)


@dataclass(frozen=True)
class Range:
    """A numeric field's range: `gt`/`ge` lower bound, `lt`/`le` upper bound; always finite."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None

    def describe(self) -> str:
        """`> 0`, `>= 2`, `in [0, 1)`, ...: what the error message says is allowed."""
        lo = ("(", ">", self.gt) if self.gt is not None else ("[", ">=", self.ge)
        hi = (")", "<", self.lt) if self.lt is not None else ("]", "<=", self.le)
        if lo[2] is not None and hi[2] is not None:
            return f"in {lo[0]}{_num(lo[2])}, {_num(hi[2])}{hi[0]}"
        if lo[2] is not None:
            return f"{lo[1]} {_num(lo[2])}"
        if hi[2] is not None:
            return f"{hi[1]} {_num(hi[2])}"
        return "finite"

    def check(self, path: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{path}={value!r} must be a number {self.describe()}")
        ok = math.isfinite(value)
        ok = ok and (self.gt is None or value > self.gt) and (self.ge is None or value >= self.ge)
        ok = ok and (self.lt is None or value < self.lt) and (self.le is None or value <= self.le)
        if not ok:
            raise ConfigError(f"{path}={value} must be {self.describe()}")


@dataclass(frozen=True)
class OneOf:
    """A string field whose choices a registry owns: `names()` lists them when checked."""

    names: Callable[[], tuple[str, ...]]

    def check(self, path: str, value: Any) -> None:
        choice(path, value, self.names())


def choice(path: str, value: Any, allowed: tuple[Any, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{path}={value!r} is not allowed; choose one of {', '.join(allowed)}")


def check_value(tp: Any, value: Any, path: str) -> None:
    """Enforce the constraints that type `tp` declares (Annotated metadata, Literal choices, and
    those of list items) on `value`."""
    origin = get_origin(tp)
    if origin is Annotated:
        base, *meta = get_args(tp)
        check_value(base, value, path)
        for m in meta:
            if isinstance(m, Range | OneOf):
                m.check(path, value)
    elif origin is Literal:
        choice(path, value, get_args(tp))
    elif origin is list and isinstance(value, list):
        (item_tp,) = get_args(tp)
        for item in value:
            check_value(item_tp, item, path)


def check_fields(obj: Any, where: str = "") -> None:
    """`check_value` on every field of dataclass `obj`, nested sections included."""
    hints = get_type_hints(type(obj), include_extras=True)
    for f in dataclasses.fields(obj):
        path = f"{where}.{f.name}" if where else f.name
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            check_fields(value, path)
        else:
            check_value(hints[f.name], value, path)
