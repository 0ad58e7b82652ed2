"""General samples: windows of general text replayed to protect general ability.

A fixed pool of windows, packed once at start from the configured sources (or the bundled
general corpus, the text the bundled model was pretrained on), sampled uniformly with its own
seeded generator whose state is checkpointed.
"""

from __future__ import annotations

import random

import numpy as np

from herllm.acquire.chunks import Experience, Packer
from herllm.acquire.sources import Document, read_documents


class WindowPool:
    """A fixed list of windows drawn uniformly without replacement within a draw, by a seeded
    generator whose state is checkpointed."""

    def __init__(self, pool: list[Experience], seed: int):
        self.pool = pool
        self.rng = np.random.default_rng(seed)

    def sample(self, k: int) -> list[Experience]:
        idx = self.rng.choice(len(self.pool), size=min(k, len(self.pool)), replace=False)
        return [self.pool[i] for i in idx]

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]


class GeneralSampler(WindowPool):
    def __init__(self, tokenizer, seq_len: int, sources: list[str], max_windows: int, seed: int):
        if sources:
            docs = [d.text for d in read_documents(sources, ["*"], [], "error")]
        else:
            from herllm.acquire.corpus import load_documents

            docs = load_documents("general", "train")
        random.Random(seed).shuffle(
            docs
        )  # a pool spread over the whole corpus, not its first files
        packer = Packer(tokenizer, seq_len)
        pool: list[Experience] = []
        for w in packer.windows(Document(f"general#{i}", d) for i, d in enumerate(docs)):
            if w.n_tokens == seq_len:
                pool.append(w)
            if len(pool) >= max_windows:
                break
        super().__init__(pool, seed)
