"""Flags generated from the config dataclasses (`--train.lr 1e-4`, one per field, help from its
docstring), the short aliases, and the overrides they turn into."""

from __future__ import annotations

import argparse
import dataclasses
from typing import get_type_hints

ALIASES = {
    "--model": "model.name_or_path",
    "--run-dir": "run_dir",
    "--max-steps": "train.max_steps",
    "--max-tokens": "train.max_tokens",
    "--batch-size": "train.batch_size",
    "--lr": "train.lr",
    "--seed": "train.seed",
    "--seq-len": "stream.seq_len",
    "--on-bad-input": "stream.on_bad_input",
    "--select": "select.policy",
    "--replay-ratio": "replay.ratio",
    "--replay-policy": "replay.policy",
    "--lora-r": "lora.r",
}
LIST_ALIASES = {
    "--include": "stream.include",
    "--exclude": "stream.exclude",
    "--eval": "eval.files",
}


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type, prefix: str = "") -> None:
    """One `--section.field` flag per dataclass field (nested), help from its docstring."""
    from herllm.config import field_docs

    docs = field_docs(cls)
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            add_dataclass_flags(parser, hints[f.name], prefix=f"{name}.")
            continue
        flags = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
        flags = [f for f in flags if f not in parser._option_string_actions]  # aliases win
        if not flags:
            continue
        parser.add_argument(
            *flags,
            dest=f"cfg:{name}",
            default=argparse.SUPPRESS,
            metavar="V",
            help=docs.get(f.name, "").replace("%", "%%"),
        )


def overrides_from_args(args: argparse.Namespace) -> list[str]:
    out = []
    for key, value in vars(args).items():
        if key.startswith("cfg:"):
            out.append(f"{key[4:]}={value}")
        elif key.startswith("alias:") and value is not None:
            field = key[6:]
            out.append(
                f"{field}={value}"
                if not isinstance(value, list)
                else f"{field}=[{','.join(_q(v) for v in value)}]"
            )
    return out


def _q(v: str) -> str:
    return "'" + v.replace("'", "''") + "'"
