"""Experience acquisition, part 3: the durable cursor (what has been consumed).

The cursor is the start of the next unread window. It is written inside every checkpoint, so a
resumed run skips exactly the windows the checkpoint had consumed: nothing lost, nothing twice.
A run on N processes writes one position per rank (each rank reads its own shard of documents,
see herllm.distributed) and the `base` document where the sharding starts.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from herllm.acquire.chunks import StreamPosition
from herllm.errors import UserError


def save_cursor(position: StreamPosition, path: str | Path, sources: list[str]) -> None:
    data = {"position": asdict(position), "sources": list(sources)}
    Path(path).write_text(json.dumps(data, indent=1), encoding="utf-8")


def load_cursor(path: str | Path, sources: list[str] | None = None) -> StreamPosition:
    positions, _base = load_shard_cursors(path, sources)
    if len(positions) != 1:
        raise UserError(
            f"{path} holds the positions of {len(positions)} processes; resume it with "
            f"`torchrun --nproc_per_node {len(positions)} -m herllm.cli adapt --resume RUN`"
        )
    return positions[0]


def save_shard_cursors(
    positions: list[StreamPosition], base: int, path: str | Path, sources: list[str]
) -> None:
    """One position per rank (rank order); rank r reads documents g >= base, (g-base) % N == r."""
    data = {"world": len(positions), "base": base, "positions": [asdict(p) for p in positions],
            "sources": list(sources)}  # fmt: skip
    Path(path).write_text(json.dumps(data, indent=1), encoding="utf-8")


def load_shard_cursors(
    path: str | Path, sources: list[str] | None = None
) -> tuple[list[StreamPosition], int]:
    """Positions per rank and the sharding base; a single-process cursor is one position, base 0."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if sources is not None and list(sources) != data["sources"]:
        raise UserError(
            f"the run was started on sources {data['sources']} but resumed with {list(sources)}; "
            "resume with the same sources (omit them to reuse the run's own)"
        )
    if "positions" in data:
        return [StreamPosition(**p) for p in data["positions"]], int(data["base"])
    return [StreamPosition(**data["position"])], 0
