"""Continual-learning metrics as pure functions of result matrices (numpy only).

Matrix convention (every function here uses it):

- A result matrix has shape ``(T + 1, T)`` for ``T`` domains seen in order.
- Row 0 is the base model before any training; row ``t`` (1..T) is the model
  after training through domain ``t``. Column ``j`` (0..T-1) is domain ``j + 1``
  in training order. So ``docs/metrics.md``'s 1-indexed ``R[t][i]`` is
  ``M[t, i - 1]`` here, its diagonal ``R[i][i]`` is ``M[i, i - 1]`` and its
  super-diagonal ``R[i - 1][i]`` is ``M[i - 1, i - 1]``.
- ``L`` holds mean held-out token NLL in nats (lower is better); ``R`` holds a
  score where higher is better (probe accuracy, or ``-L``).

Sign conventions: BWT and FWT are written for ``R``; pass ``-L`` for their loss
form, so a negative BWT always means forgetting. Forgetting is positive when a
domain got worse in both of its forms (``forgetting(R)`` and
``forgetting_loss(L)``), and ``forgetting(-L) == forgetting_loss(L)``.

With ``T = 1`` there is no earlier domain to forget and no later domain to
transfer to: BWT, forgetting and FWT return NaN (undefined, not 0) so that a
mean over runs never silently counts them as "no forgetting".
NaN entries in a matrix propagate to the metrics that read them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "AdaptationSpeed",
    "StabilityGap",
    "adaptation_index",
    "adaptation_speed",
    "average_accuracy",
    "average_final_loss",
    "average_perplexity",
    "backward_transfer",
    "forgetting",
    "forgetting_loss",
    "forward_transfer",
    "general_ability_delta",
    "loss_matrix_summary",
    "plasticity",
    "plasticity_ratio",
    "routing_accuracy",
    "routing_confusion",
    "routing_per_domain",
    "stability_gap",
]


def _result_matrix(matrix: ArrayLike, name: str) -> np.ndarray:
    """Return ``matrix`` as float64 after checking the ``(T + 1, T)`` convention."""
    m = np.asarray(matrix, dtype=np.float64)
    if m.ndim != 2 or m.shape[1] < 1 or m.shape[0] != m.shape[1] + 1:
        raise ValueError(
            f"{name} must have shape (T+1, T) (row 0 = base model, row t = after domain t), "
            f"got shape {m.shape}"
        )
    return m


# ---------------------------------------------------------------- final quality


def average_final_loss(loss: ArrayLike) -> float:
    """``mean_i L[T][i]``: mean held-out NLL over all domains after the last one."""
    m = _result_matrix(loss, "loss matrix")
    return float(m[-1].mean())


def average_perplexity(loss: ArrayLike) -> float:
    """``exp(mean_i L[T][i])``: the exp of the mean log-loss, never a mean of perplexities."""
    return float(np.exp(average_final_loss(loss)))


def average_accuracy(score: ArrayLike) -> float:
    """Average accuracy (AA, "OP"): ``mean_i R[T][i]``."""
    m = _result_matrix(score, "score matrix")
    return float(m[-1].mean())


# ---------------------------------------------------------------- transfer and forgetting


def backward_transfer(score: ArrayLike) -> float:
    """GEM BWT: ``(1/(T-1)) sum_{i<T} (R[T][i] - R[i][i])``; negative means forgetting.

    Pass ``-L`` for the loss form. NaN for ``T = 1``.
    """
    m = _result_matrix(score, "score matrix")
    t = m.shape[1]
    if t == 1:
        return float("nan")
    cols = np.arange(t - 1)  # domains 1..T-1 (1-indexed)
    return float(np.mean(m[t, cols] - m[cols + 1, cols]))


def forgetting(score: ArrayLike) -> float:
    """Max-form forgetting, accuracy form; positive means forgetting.

    ``(1/(T-1)) sum_{i<T} max_{l in [i, T-1]} (R[l][i] - R[T][i])``. Not clamped
    at 0: a domain that only improved after it was trained contributes a
    negative term. NaN for ``T = 1``.
    """
    m = _result_matrix(score, "score matrix")
    t = m.shape[1]
    if t == 1:
        return float("nan")
    # Domain in column j was trained at row j + 1; its best score before the end
    # is the max over rows j+1..T-1.
    terms = [m[j + 1 : t, j].max() - m[t, j] for j in range(t - 1)]
    return float(np.mean(terms))


def forgetting_loss(loss: ArrayLike) -> float:
    """Max-form forgetting, loss form; positive means forgetting.

    ``(1/(T-1)) sum_{i<T} (L[T][i] - min_{l in [i, T-1]} L[l][i])``; equal to
    ``forgetting(-L)``. NaN for ``T = 1``.
    """
    m = _result_matrix(loss, "loss matrix")
    t = m.shape[1]
    if t == 1:
        return float("nan")
    terms = [m[t, j] - m[j + 1 : t, j].min() for j in range(t - 1)]
    return float(np.mean(terms))


def forward_transfer(score: ArrayLike) -> float:
    """FWT: ``(1/(T-1)) sum_{i>=2} (R[i-1][i] - b[i])`` with ``b = R[0]``.

    Transfer to a domain just before it is trained on, against the base model.
    Pass ``-L`` for the loss form (positive = the stream lowered its loss). NaN
    for ``T = 1``.
    """
    m = _result_matrix(score, "score matrix")
    t = m.shape[1]
    if t == 1:
        return float("nan")
    cols = np.arange(1, t)  # domains 2..T (1-indexed); row i-1 is column index i-1
    return float(np.mean(m[cols, cols] - m[0, cols]))


# ---------------------------------------------------------------- plasticity and general ability


def plasticity(loss: ArrayLike) -> float:
    """``mean_i L[i][i]``: held-out loss on each domain right after training on it."""
    m = _result_matrix(loss, "loss matrix")
    t = m.shape[1]
    cols = np.arange(t)
    return float(m[cols + 1, cols].mean())


def plasticity_ratio(loss: ArrayLike, naive_loss: ArrayLike) -> float:
    """``plasticity(loss) / plasticity(naive_loss)`` against naive fine-tuning.

    1.0 learns new domains as well as naive fine-tuning; above 1 learns them
    worse (higher loss), below 1 better. Both matrices must have the same shape.
    """
    m = _result_matrix(loss, "loss matrix")
    n = _result_matrix(naive_loss, "naive loss matrix")
    if m.shape != n.shape:
        raise ValueError(
            f"naive loss matrix has shape {n.shape} but loss matrix has {m.shape}; "
            "compare runs over the same domains"
        )
    return plasticity(m) / plasticity(n)


def general_ability_delta(general_loss: ArrayLike) -> float:
    """``L[T][general] - L[0][general]``; positive means general ability got worse.

    ``general_loss`` has shape ``(T + 1,)``: the loss on a general held-out set
    (never trained on) for the base model and after each domain.
    """
    g = np.asarray(general_loss, dtype=np.float64)
    if g.ndim != 1 or g.shape[0] < 2:
        raise ValueError(
            f"general_loss must have shape (T+1,) with T >= 1 (base model first), got {g.shape}"
        )
    return float(g[-1] - g[0])


def loss_matrix_summary(loss: ArrayLike) -> dict[str, float]:
    """Every metric that a loss matrix alone defines, keyed by a stable name."""
    m = _result_matrix(loss, "loss matrix")
    return {
        "avg_final_loss": average_final_loss(m),
        "avg_perplexity": average_perplexity(m),
        "plasticity": plasticity(m),
        "forgetting_loss": forgetting_loss(m),
        "bwt_neg_loss": backward_transfer(-m),
        "fwt_neg_loss": forward_transfer(-m),
    }


# ---------------------------------------------------------------- per-step trace metrics


def _trace(
    steps: ArrayLike, losses: ArrayLike, switch_steps: Sequence[int]
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Validate an evaluation trace; return steps, losses and the row of each switch."""
    s = np.asarray(steps)
    ls = np.asarray(losses, dtype=np.float64)
    if s.ndim != 1 or s.size == 0 or ls.ndim != 2 or ls.shape[0] != s.shape[0]:
        raise ValueError(
            f"trace must be steps (N,) and losses (N, T) with N >= 1, got {s.shape} and {ls.shape}"
        )
    if np.any(np.diff(s) <= 0):
        raise ValueError("trace steps must be strictly increasing; sort the evaluations by step")
    if len(switch_steps) > ls.shape[1] - 1:
        raise ValueError(
            f"{len(switch_steps)} switch steps for {ls.shape[1]} domains; expected at most T-1"
        )
    rows = []
    for sw in switch_steps:
        hit = np.flatnonzero(s == sw)
        if hit.size == 0:
            raise ValueError(
                f"no evaluation at switch step {sw}; evaluate right before each new domain starts"
            )
        rows.append(int(hit[0]))
    if any(b <= a for a, b in zip(rows, rows[1:], strict=False)):
        raise ValueError(f"switch steps must be strictly increasing, got {list(switch_steps)}")
    return s, ls, rows


@dataclass(frozen=True)
class StabilityGap:
    """Stability gap of a run, from a per-step evaluation trace.

    Attributes:
        gaps: ``(S, T)``; ``gaps[k, i]`` = max over evaluations in the segment
            after switch ``k`` of ``L_step[i] - L_switch[i]``, for earlier domains
            ``i <= k``; NaN where domain ``i`` is not earlier than switch ``k``.
        per_switch: ``(S,)`` mean of ``gaps[k]`` over its earlier domains.
        mean: mean over all (switch, earlier domain) pairs; NaN when ``S = 0``.
    """

    gaps: np.ndarray
    per_switch: np.ndarray
    mean: float


def stability_gap(steps: ArrayLike, losses: ArrayLike, switch_steps: Sequence[int]) -> StabilityGap:
    """Transient loss increase on earlier domains right after each domain switch.

    Args:
        steps: ``(N,)`` strictly increasing optimizer steps of the evaluations;
            an evaluation at step ``s`` sees the model after ``s`` updates.
        losses: ``(N, T)`` held-out NLL per domain, columns in training order.
        switch_steps: ``(S,)`` with ``S <= T - 1``; ``switch_steps[k]`` is the
            step at which domain ``k + 1`` (0-indexed) starts, and must have an
            evaluation: that one is ``L_before_switch``.

    The segment after switch ``k`` runs over evaluations with
    ``switch_steps[k] < step <= switch_steps[k + 1]`` (or the trace end for the
    last switch). Gaps are not clamped: negative means the earlier domain only
    improved. A switch with no evaluation after it raises ``ValueError``.
    """
    s, ls, rows = _trace(steps, losses, switch_steps)
    n_switch, n_dom = len(rows), ls.shape[1]
    gaps = np.full((n_switch, n_dom), np.nan)
    ends = [*rows[1:], len(s) - 1][:n_switch]  # each segment ends at the next switch
    for k, (start, end) in enumerate(zip(rows, ends, strict=True)):
        if end <= start:
            raise ValueError(
                f"no evaluation after switch step {switch_steps[k]}; the stability gap needs some"
            )
        after = ls[start + 1 : end + 1, : k + 1]  # (n_after, k+1) earlier domains only
        gaps[k, : k + 1] = after.max(axis=0) - ls[start, : k + 1]
    defined = gaps[~np.isnan(gaps)] if n_switch else np.empty(0)
    per_switch = np.array([np.nanmean(row) for row in gaps]) if n_switch else np.empty(0)
    mean = float(defined.mean()) if defined.size else float("nan")
    return StabilityGap(gaps=gaps, per_switch=per_switch, mean=mean)


def adaptation_index(losses: ArrayLike, rel_tol: float = 0.05) -> int:
    """Index of the first loss within ``rel_tol`` of the last: ``|l - l[-1]| <= rel_tol * |l[-1]|``.

    ``losses`` is one domain's held-out loss over its own segment, the first
    entry evaluated at the switch (before any update on the domain). First
    entry into the band counts, even if the curve leaves it again later.
    """
    ls = np.asarray(losses, dtype=np.float64)
    if ls.ndim != 1 or ls.size == 0:
        raise ValueError(f"losses must be a non-empty 1-D curve, got shape {ls.shape}")
    if not rel_tol >= 0:
        raise ValueError(f"rel_tol must be >= 0, got {rel_tol}")
    final = ls[-1]
    within = np.abs(ls - final) <= rel_tol * abs(final)
    return int(np.argmax(within))  # the last entry is always within, so argmax finds a hit


@dataclass(frozen=True)
class AdaptationSpeed:
    """Cost to learn each domain, from the start of its segment.

    Attributes:
        tokens: ``(T,)`` trained tokens until the domain's held-out loss is
            within ``rel_tol`` of its value at the segment end; NaN for domains
            whose segment has no evaluation after its start.
        seconds: ``(T,)`` the same in wall-clock seconds.
    """

    tokens: np.ndarray
    seconds: np.ndarray


def adaptation_speed(
    steps: ArrayLike,
    losses: ArrayLike,
    switch_steps: Sequence[int],
    tokens: ArrayLike,
    seconds: ArrayLike,
    rel_tol: float = 0.05,
) -> AdaptationSpeed:
    """Tokens and seconds each domain needs to reach (within 5%) its final loss.

    Same trace as :func:`stability_gap`, plus cumulative trained ``tokens`` and
    wall-clock ``seconds`` at each evaluation, both ``(N,)``. Domain ``k``'s
    segment runs from ``switch_steps[k - 1]`` (domain 0: the first evaluation,
    normally the base model at step 0) to ``switch_steps[k]`` (last domain: the
    trace end); its "final value" is its loss at the segment end.
    """
    s, ls, rows = _trace(steps, losses, switch_steps)
    tok = np.asarray(tokens, dtype=np.float64)
    sec = np.asarray(seconds, dtype=np.float64)
    if tok.shape != s.shape or sec.shape != s.shape:
        raise ValueError(
            f"tokens {tok.shape} and seconds {sec.shape} must match steps {s.shape}: "
            "one value per evaluation"
        )
    n_dom = ls.shape[1]
    out_tok, out_sec = np.full(n_dom, np.nan), np.full(n_dom, np.nan)
    starts, ends = [0, *rows], [*rows, len(s) - 1]
    for k, (start, end) in enumerate(zip(starts, ends, strict=True)):
        if end <= start:
            continue  # the trace stops at this domain's switch: not trained yet
        hit = start + adaptation_index(ls[start : end + 1, k], rel_tol)
        out_tok[k] = tok[hit] - tok[start]
        out_sec[k] = sec[hit] - sec[start]
    return AdaptationSpeed(tokens=out_tok, seconds=out_sec)


# ---------------------------------------------------------------- routing


def routing_confusion(
    true_domain: ArrayLike, routed: ArrayLike, n_domains: int, n_routes: int | None = None
) -> np.ndarray:
    """Confusion counts ``C[i, j]`` = held-out samples of domain ``i`` routed to ``j``.

    ``routed[k]`` is the domain the chosen adapter was grown for; indices
    ``n_domains .. n_routes - 1`` are adapters grown for no known domain (e.g.
    spurious expansions). Returns an int64 ``(n_domains, n_routes)`` matrix,
    ``n_routes`` defaulting to ``n_domains``.
    """
    y = np.asarray(true_domain)
    r = np.asarray(routed)
    n_routes = n_domains if n_routes is None else n_routes
    if y.ndim != 1 or y.shape != r.shape:
        raise ValueError(f"true_domain {y.shape} and routed {r.shape} must be equal-length 1-D")
    if n_domains < 1 or n_routes < n_domains:
        raise ValueError(f"need 1 <= n_domains <= n_routes, got {n_domains} and {n_routes}")
    if y.size and (y.min() < 0 or y.max() >= n_domains or r.min() < 0 or r.max() >= n_routes):
        raise ValueError(
            f"labels out of range: true_domain must lie in [0, {n_domains}), "
            f"routed in [0, {n_routes})"
        )
    conf = np.zeros((n_domains, n_routes), dtype=np.int64)
    np.add.at(conf, (y.astype(np.int64), r.astype(np.int64)), 1)
    return conf


def routing_accuracy(confusion: ArrayLike) -> float:
    """Share of all held-out samples routed to their own domain's adapter (NaN if none)."""
    c = np.asarray(confusion, dtype=np.float64)
    if c.ndim != 2 or c.shape[1] < c.shape[0]:
        raise ValueError(f"confusion must have shape (D, A) with A >= D, got {c.shape}")
    total = c.sum()
    return float(np.trace(c) / total) if total else float("nan")


def routing_per_domain(confusion: ArrayLike) -> np.ndarray:
    """``(D,)`` share of domain ``i``'s samples routed to adapter ``i``; NaN for empty rows."""
    c = np.asarray(confusion, dtype=np.float64)
    if c.ndim != 2 or c.shape[1] < c.shape[0]:
        raise ValueError(f"confusion must have shape (D, A) with A >= D, got {c.shape}")
    rows = c.sum(axis=1)
    diag = np.diagonal(c)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(rows > 0, diag / rows, np.nan)
