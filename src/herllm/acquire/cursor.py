"""Experience acquisition, part 3: the durable cursor (what has been consumed).

The cursor is the start of the next unread window. It is written inside every checkpoint, so a
resumed run skips exactly the windows the checkpoint had consumed: nothing lost, nothing twice.
A run on N processes writes one position per rank (each rank reads its own shard of documents,
see herllm.parallel.ranks) and the `Sharding` that deals the documents to the ranks.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from herllm.acquire.chunks import StreamPosition
from herllm.acquire.sources import WAIT
from herllm.errors import UserError


def save_cursor(position: StreamPosition, path: str | Path, sources: list[str]) -> None:
    data = {"position": asdict(position), "sources": list(sources)}
    Path(path).write_text(json.dumps(data, indent=1), encoding="utf-8")


@dataclass
class Sharding:
    """Which documents each of `world` ranks reads: the stream's documents from index `base` on,
    less those in `done` (already learned), dealt round robin in stream order (the j-th remaining
    document goes to rank j % world, as its (j // world)-th). A document in `partial` was
    interrupted: reading starts at its token offset.

    A fresh run is `Sharding(world)`. `redeal` continues N ranks' positions on M ranks, so a
    checkpoint of N processes resumes under any number of them with no document read twice and
    none skipped.
    """

    world: int = 1
    base: int = 0
    done: list[int] = field(default_factory=list)
    """Sorted global indices >= base of documents already learned."""
    partial: dict[int, tuple[int, str]] = field(default_factory=dict)
    """Global index -> (token offset where reading resumes, document id)."""

    def trivial(self) -> bool:
        return self.base == 0 and not self.done and not self.partial

    def global_of(self, j: int) -> int:
        """Global index of the j-th remaining document."""
        g = self.base + j
        for d in self.done:  # ascending: each done index at or below g pushes g one further
            if d <= g:
                g += 1
            else:
                break
        return g

    def rank_of(self, g: int) -> tuple[int, int] | None:
        """(rank, local index) that reads global document g, or None when it is not dealt."""
        if g < self.base or g in self.done:
            return None
        j = g - self.base - sum(1 for d in self.done if d < g)
        return j % self.world, j // self.world

    def select(self, docs, rank: int):
        """This rank's documents from the whole stream `docs`."""
        done = set(self.done)
        j = 0
        g = -1
        for doc in docs:
            if doc is WAIT:  # a followed source has nothing new now
                yield doc
                continue
            g += 1
            if g < self.base or g in done:
                continue
            if j % self.world == rank:
                yield doc
            j += 1

    def offsets(self, rank: int) -> dict[int, tuple[int, str]]:
        """Local index -> (start offset, document id) of this rank's interrupted documents."""
        out = {}
        for g, v in self.partial.items():
            where = self.rank_of(g)
            if where is not None and where[0] == rank:
                out[where[1]] = tuple(v)
        return out

    def redeal(self, positions: list[StreamPosition], world: int) -> Sharding:
        """The sharding that continues `positions` (one per rank of this sharding) on `world`
        ranks: everything before the slowest rank's document is done, the documents past it
        that faster ranks learned are listed in `done`, and every rank's current document
        becomes `partial` at its offset."""
        n = self.world
        fronts = [self.global_of(r + p.doc_index * n) for r, p in enumerate(positions)]
        base = min(fronts)
        done = {d for d in self.done if d >= base}
        for r, p in enumerate(positions):
            for i in range(p.doc_index - 1, -1, -1):  # this rank's learned documents, newest first
                g = self.global_of(r + i * n)
                if g < base:
                    break
                done.add(g)
        partial = {g: tuple(v) for g, v in self.partial.items() if g >= base and g not in done}
        for g, p in zip(fronts, positions, strict=True):
            if p.token_offset > 0:
                partial[g] = (p.token_offset, p.doc_id)
        return Sharding(world, base, sorted(done), partial)

    def to_json(self) -> dict:
        return {"world": self.world, "base": self.base, "done": self.done,
                "partial": {str(g): list(v) for g, v in self.partial.items()}}  # fmt: skip

    @classmethod
    def from_json(cls, data: dict) -> Sharding:
        partial = {int(g): tuple(v) for g, v in data.get("partial", {}).items()}
        return cls(int(data["world"]), int(data["base"]), list(data.get("done", [])), partial)


def save_shard_cursors(
    positions: list[StreamPosition], sharding: Sharding, path: str | Path, sources: list[str]
) -> None:
    """One position per rank (rank order) and the sharding that deals the documents to them."""
    data = {**sharding.to_json(), "positions": [asdict(p) for p in positions],
            "sources": list(sources)}  # fmt: skip
    Path(path).write_text(json.dumps(data, indent=1), encoding="utf-8")


def load_shard_cursors(
    path: str | Path, sources: list[str] | None = None
) -> tuple[list[StreamPosition], Sharding]:
    """Positions per rank and their sharding; a single-process cursor is one position."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if sources is not None and list(sources) != data["sources"]:
        raise UserError(
            f"the run was started on sources {data['sources']} but resumed with {list(sources)}; "
            "resume with the same sources (omit them to reuse the run's own)"
        )
    if "positions" in data:
        return [StreamPosition(**p) for p in data["positions"]], Sharding.from_json(data)
    return [StreamPosition(**data["position"])], Sharding()
