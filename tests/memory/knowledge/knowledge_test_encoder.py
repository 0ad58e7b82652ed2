"""A fast deterministic encoder for the store tests (also imported by the crash-test child)."""

from __future__ import annotations

import re
import zlib

import numpy as np


class HashEncoder:
    """Bag of hashed words, L2-normalised: no model, instant, same output every run."""

    name = "hash-test-64"
    spec = "hash"
    dim = 64

    def encode(self, texts) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)  # (N, D)
        for i, text in enumerate(texts):
            for word in re.findall(r"\w+", text.lower()):
                out[i, zlib.crc32(word.encode()) % self.dim] += 1.0
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1e-9)
