"""dict / YAML <-> dataclass, and `section.key=value` overrides.

`from_dict` reads any config dataclass (the run's, the benchmark's, pretraining's): unknown keys,
values of the wrong type and values outside a field's declared range or choices raise
`ConfigError` naming the field path.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import types
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from herllm.config.fields import ConfigError, check_value
from herllm.config.sections import RunConfig


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass (the string literal right below each field)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for prev, node in zip(body, body[1:], strict=False):
        if (
            isinstance(prev, ast.AnnAssign)
            and isinstance(prev.target, ast.Name)
            and isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            docs[prev.target.id] = node.value.value
    return docs


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass `cls` from a nested dict; unknown keys raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls, include_extras=True)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            raise ConfigError(
                f"unknown config key {path!r}; allowed here: {', '.join(sorted(names))}"
            )
        kwargs[key] = _coerce(hints[key], value, path)
    return cls(**kwargs)


def to_dict(obj: Any) -> dict[str, Any]:
    """Nested plain-dict view of a dataclass (for YAML)."""
    return dataclasses.asdict(obj)


def _coerce(tp: Any, value: Any, path: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value or {}, path)
    origin = get_origin(tp)
    if origin is Annotated:  # the base type, then the field's own range or choices
        value = _coerce(get_args(tp)[0], value, path)
        check_value(tp, value, path)
        return value
    if origin is Literal:
        value = _coerce(type(get_args(tp)[0]), value, path)
        check_value(tp, value, path)
        return value
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if isinstance(value, str) and str in options:
            return value
        for opt in options:
            if opt is not str and opt is not type(None):
                return _coerce(opt, value, path)
    if origin is list:
        (item_tp,) = get_args(tp)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ConfigError(f"{path} must be a list, got {value!r}")
        return [_coerce(item_tp, v, path) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{path}={value!r} must be true or false")
    if tp in (int, float):
        try:
            if tp is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return tp(float(value)) if tp is int else tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{path}={value!r} must be {tp.__name__}") from None
    if tp is str:
        if not isinstance(value, str | int | float):
            raise ConfigError(f"{path}={value!r} must be a string")
        return str(value)
    return value


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a dict, with one-line errors."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist; check the --config path")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file {p}{line} is not valid YAML; fix the syntax") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {p} must hold a mapping of sections, not {type(data).__name__}"
        )
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` overrides (values parsed as YAML scalars/lists)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw else ""
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        node[parts[-1]] = value
    return data


def build_config(
    yaml_path: str | None = None, overrides: list[str] | None = None, base: dict | None = None
) -> RunConfig:
    """Merge base dict <- YAML file <- overrides, then build and validate a RunConfig."""
    data: dict[str, Any] = _deep_merge(base or {}, load_yaml(yaml_path) if yaml_path else {})
    data = apply_overrides(data, overrides or [])
    return from_dict(RunConfig, data).validate()


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = (
            _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        )
    return out


def save_yaml(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
