"""Re-dealing a stream's documents when a run resumes on another number of processes: every
token of every document is read exactly once, whatever the stopping points and process counts."""

import random
from collections import Counter

import pytest

from herllm.acquire.chunks import StreamPosition
from herllm.acquire.cursor import Sharding


def read(sharding: Sharding, rank: int, lengths: list[int], start: StreamPosition, budget: int,
         seen: Counter) -> StreamPosition:  # fmt: skip
    """Read up to `budget` tokens of this rank's documents from `start`, as the Packer does
    (an interrupted document resumes at its offset); returns the next position."""
    docs = list(sharding.select(range(len(lengths)), rank))
    offsets = sharding.offsets(rank)
    k, t = start.doc_index, start.token_offset
    while k < len(docs) and budget > 0:
        g = docs[k]
        skip, doc_id = offsets.get(k, (0, None))
        if doc_id is not None:
            assert doc_id == f"doc{g}"  # the interrupted document is the one dealt here
        t = max(t, skip)
        while t < lengths[g] and budget > 0:
            seen[(g, t)] += 1
            t += 1
            budget -= 1
        if t == lengths[g]:
            k, t = k + 1, 0
    return StreamPosition(k, t, f"doc{docs[k]}" if k < len(docs) and t else None)


@pytest.mark.parametrize("seed", range(20))
def test_redeal_reads_every_token_once(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 40) for _ in range(rng.randint(1, 120))]
    seen: Counter = Counter()
    world = rng.randint(1, 4)
    sharding, positions = Sharding(world), [StreamPosition() for _ in range(world)]
    for _ in range(rng.randint(1, 6)):  # runs stopped at random points, resumed on 1-5 processes
        positions = [read(sharding, r, lengths, positions[r], rng.randint(0, 300), seen)
                     for r in range(world)]  # fmt: skip
        new = rng.randint(1, 5)
        if new != world:
            sharding, world = sharding.redeal(positions, new), new
            positions = [StreamPosition() for _ in range(world)]
        sharding = Sharding.from_json(sharding.to_json())  # through the cursor file's format
    for r in range(world):  # run every rank to the end of its shard
        read(sharding, r, lengths, positions[r], 10**9, seen)
    expected = {(g, t) for g, n in enumerate(lengths) for t in range(n)}
    assert set(seen) == expected
    assert max(seen.values()) == 1


def test_redeal_lists_what_faster_ranks_learned():
    # 2 ranks over docs 0..9 (rank 0: 0,2,4,..; rank 1: 1,3,5,..); rank 0 finished docs 0,2,4
    # and is 5 tokens into doc 6; rank 1 finished doc 1 only.
    s = Sharding(2).redeal([StreamPosition(3, 5, "doc6"), StreamPosition(1, 0, None)], 3)
    assert (s.base, s.done, s.partial) == (3, [4], {6: (5, "doc6")})
    # 3 ranks deal the remaining documents 3, 5, 6, 7, 8, 9 round robin
    assert [list(s.select(range(10), r)) for r in range(3)] == [[3, 7], [5, 8], [6, 9]]
    assert s.offsets(2) == {0: (5, "doc6")} and s.offsets(0) == {}
    assert [s.global_of(j) for j in range(6)] == [3, 5, 6, 7, 8, 9]
