"""Label-free signals on a fixed probe set: entropy, representation drift, sample quality.

Batches are dicts of tensors, the format used throughout herllm:
``input_ids (B, T)``, optional ``attention_mask (B, T)`` (1 = real token) and
optional ``labels (B, T)`` where -100 marks a position that is not scored.
Position ``t``'s logits predict token ``t + 1``, so a token is scored when its
label is not -100 (without labels: when its attention mask is 1); the first
token of a sequence is never scored.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import torch
import torch.nn.functional as F

__all__ = [
    "collect_hidden_states",
    "distinct_n",
    "layerwise_cka",
    "linear_cka",
    "mean_token_entropy",
    "mean_token_nll",
    "repetition_rate",
    "samples_to_batches",
    "token_entropy",
]

Batch = dict[str, torch.Tensor]


# ---------------------------------------------------------------- batched no-grad passes


@contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Run ``model`` in eval mode without gradients, then restore its training flag."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _targets(batch: Batch) -> torch.Tensor:
    """``(B, T)`` target ids with -100 where a position is not scored."""
    if "labels" in batch:
        return batch["labels"]
    ids = batch["input_ids"]
    mask = batch.get("attention_mask", torch.ones_like(ids))
    return ids.masked_fill(mask == 0, -100)


def _shifted_passes(
    model: torch.nn.Module, batches: Iterable[Batch]
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(logits (B, T-1, V) float32, targets (B, T-1))`` aligned for next-token scoring."""
    device = _device(model)
    with _eval_mode(model):
        for batch in batches:
            ids = batch["input_ids"].to(device)
            mask = batch.get("attention_mask")
            mask = None if mask is None else mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
            targets = _targets(batch).to(device)[:, 1:]  # (B, T-1)
            yield logits[:, :-1].float(), targets


def _token_weighted_mean(
    model: torch.nn.Module,
    batches: Iterable[Batch],
    per_token: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> float:
    """Mean of ``per_token(logits, targets)`` over all scored tokens of all batches."""
    total, count = 0.0, 0
    for logits, targets in _shifted_passes(model, batches):
        scored = targets != -100  # (B, T-1)
        total += per_token(logits[scored], targets[scored]).sum().item()
        count += int(scored.sum())
    if count == 0:
        raise ValueError("no scored tokens in the batches: every label is -100 or masked out")
    return total / count


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of the softmax over the last dimension: ``(..., V) -> (...)``."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def mean_token_entropy(model: torch.nn.Module, batches: Iterable[Batch]) -> float:
    """Mean predictive entropy (nats) over every scored token of a fixed probe set.

    Token-weighted across batches, so the result does not depend on batching.
    Its drift is the difference between two calls (current minus base model).
    """
    return _token_weighted_mean(model, batches, lambda logits, _: token_entropy(logits))


def mean_token_nll(model: torch.nn.Module, batches: Iterable[Batch]) -> float:
    """Mean next-token NLL (nats) of the scored tokens under ``model``.

    Use it with a reference (e.g. base) model on batches of generated samples,
    built by :func:`samples_to_batches`, to score how plausible they are.
    """
    return _token_weighted_mean(
        model, batches, lambda logits, tgt: F.cross_entropy(logits, tgt, reduction="none")
    )


def samples_to_batches(
    samples: Sequence[Sequence[int]],
    batch_size: int,
    pad_token_id: int,
    prompt_lengths: Sequence[int] | None = None,
) -> list[Batch]:
    """Right-pad token lists into batches whose labels score only generated tokens.

    ``prompt_lengths[k]`` leading tokens of ``samples[k]`` are the prompt and
    get label -100, as does padding. Right padding is safe for causal models:
    no real token attends to a pad.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    prompts = [0] * len(samples) if prompt_lengths is None else list(prompt_lengths)
    if len(prompts) != len(samples):
        raise ValueError(f"{len(prompts)} prompt_lengths for {len(samples)} samples; give one each")
    batches = []
    for lo in range(0, len(samples), batch_size):
        chunk = samples[lo : lo + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)  # (B, T)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for row, (sample, n_prompt) in enumerate(zip(chunk, prompts[lo:], strict=False)):
            n = len(sample)
            ids[row, :n] = torch.as_tensor(list(sample), dtype=torch.long)
            mask[row, :n] = 1
            labels[row, n_prompt:n] = ids[row, n_prompt:n]
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


# ---------------------------------------------------------------- representation drift (CKA)


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA ``||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)`` on column-centred activations.

    ``x`` is ``(N, D1)`` and ``y`` is ``(N, D2)`` with rows aligned (same
    examples or tokens). Computed in float64 in feature space (``D x D``
    products), which is cheap when ``N >> D``. Invariant to orthogonal
    transforms and isotropic scaling of either side; 1 for ``x == y``. NaN
    when either side has zero variance (CKA is undefined there).
    """
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"CKA needs (N, D1) and (N, D2) with equal N, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    x = x.double() - x.double().mean(dim=0, keepdim=True)  # (N, D1)
    y = y.double() - y.double().mean(dim=0, keepdim=True)  # (N, D2)
    cross = torch.linalg.matrix_norm(y.T @ x) ** 2  # ||Y^T X||_F^2
    denom = torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)
    if denom.item() == 0.0:
        return float("nan")
    return (cross / denom).item()


def collect_hidden_states(
    model: torch.nn.Module,
    batches: Iterable[Batch],
    pooling: Literal["token", "mean"] = "token",
) -> list[torch.Tensor]:
    """Per-layer hidden states of the probe set via ``output_hidden_states=True``.

    Returns one CPU float32 tensor per entry of ``hidden_states`` (embeddings
    first, then each layer): ``(n_tokens, D)`` for ``pooling="token"`` (every
    real token, by attention mask) or ``(n_sequences, D)`` for ``"mean"``
    (mean over each sequence's real tokens).

    Token level is the default for CKA: the probe set gives far more tokens
    than the hidden size, while with a few dozen pooled sequences (``N < D``)
    linear CKA is biased towards 1 even for unrelated representations. Both
    models see the same inputs and masks, so token rows stay aligned. For a
    PEFT model, collect the base states once under ``model.disable_adapter()``.
    """
    if pooling not in ("token", "mean"):
        raise ValueError(f"pooling must be 'token' or 'mean', got {pooling!r}")
    device = _device(model)
    per_layer: list[list[torch.Tensor]] = []
    with _eval_mode(model):
        for batch in batches:
            ids = batch["input_ids"].to(device)
            mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).to(device)
            out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            keep = mask.bool()  # (B, T)
            for layer, h in enumerate(out.hidden_states):  # each (B, T, D)
                if pooling == "token":
                    pooled = h[keep]  # (n_real_tokens, D)
                else:
                    w = keep.unsqueeze(-1).to(h.dtype)  # (B, T, 1)
                    pooled = (h * w).sum(dim=1) / w.sum(dim=1).clamp(min=1)  # (B, D)
                if layer == len(per_layer):
                    per_layer.append([])
                per_layer[layer].append(pooled.float().cpu())
    return [torch.cat(chunks) for chunks in per_layer]


def layerwise_cka(current: Sequence[torch.Tensor], base: Sequence[torch.Tensor]) -> list[float]:
    """Per-layer :func:`linear_cka` between current and base :func:`collect_hidden_states`."""
    if len(current) != len(base):
        raise ValueError(
            f"{len(current)} current layers vs {len(base)} base layers; "
            "collect both from the same architecture"
        )
    return [linear_cka(c, b) for c, b in zip(current, base, strict=True)]


# ---------------------------------------------------------------- generated-sample quality


def _ngrams(tokens: Sequence[object], n: int) -> list[tuple[object, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(samples: Sequence[Sequence[object]], n: int) -> float:
    """Corpus-level distinct-n: unique n-grams over all n-grams of all samples.

    The denominator is the n-gram count (not the token count as in Li et al.
    2016), so the value lies in (0, 1]. Samples shorter than ``n`` add nothing;
    NaN when no sample has an n-gram.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    grams = [g for sample in samples for g in _ngrams(sample, n)]
    return len(set(grams)) / len(grams) if grams else float("nan")


def repetition_rate(samples: Sequence[Sequence[object]], n: int = 4) -> float:
    """Share of n-gram occurrences that repeat an n-gram seen earlier in the same sample.

    Pooled over samples: ``sum_s (|ngrams(s)| - |unique ngrams(s)|) / sum_s |ngrams(s)|``,
    i.e. seq-rep-n of Welleck et al. 2019 (equal to its per-sample mean when
    samples have equal length). With ``n = 4``: the share of tokens that end a
    4-gram already produced in the sample. Repeats across different samples do
    not count (that is what :func:`distinct_n` measures). NaN when no n-grams.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    total, repeated = 0, 0
    for sample in samples:
        grams = _ngrams(sample, n)
        total += len(grams)
        repeated += len(grams) - len(set(grams))
    return repeated / total if total else float("nan")
