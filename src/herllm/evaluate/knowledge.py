"""Metrics of the knowledge benchmark, as pure functions (golden tests in
tests/evaluate/test_knowledge_metrics.py).

* Exact match: the greedy continuation, case and punctuation folded, starts with the folded
  target at a word boundary (a continuation runs on past the answer; the answer must come first).
* Target NLL: mean negative log-likelihood (nats per token) of the target's tokens given the probe.
* recall@k: share of probes whose own document is among the first k retrieved passages' documents.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

import numpy as np

_PUNCT = re.compile(r"[^\w\s]|_", re.UNICODE)


def fold(text: str) -> str:
    """Lower-case, punctuation to spaces, whitespace collapsed (NFKC first: curly quotes too)."""
    text = unicodedata.normalize("NFKC", text).lower()
    return " ".join(_PUNCT.sub(" ", text).split())


def exact_match(continuation: str, target: str) -> bool:
    """Whether the folded continuation begins with the folded target, ending on a word boundary."""
    c, t = fold(continuation), fold(target)
    if not t:
        return False
    return c == t or c.startswith(t + " ")


def target_nll(logits: np.ndarray, targets: Sequence[int]) -> float:
    """Mean NLL of ``targets`` (T,) under ``logits`` (T, V), row t predicting targets[t]."""
    z = np.asarray(logits, dtype=np.float64)
    logz = z.max(-1) + np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1))  # (T,)
    picked = z[np.arange(len(targets)), np.asarray(targets)]
    return float(np.mean(logz - picked))


def recall_at_k(retrieved: Sequence[Sequence[str]], truth: Sequence[str], k: int) -> float:
    """Share of probes i whose document truth[i] is among retrieved[i][:k]."""
    if not truth:
        return float("nan")
    return float(np.mean([t in list(r)[:k] for r, t in zip(retrieved, truth, strict=True)]))


def relative_drop(first: float, last: float) -> float:
    """(first - last) / first: the share of an earlier score lost later (nan when first is 0)."""
    return (first - last) / first if first else float("nan")


def ratio(x: float, reference: float) -> float:
    """x / reference (nan when the reference is 0)."""
    return x / reference if reference else float("nan")
