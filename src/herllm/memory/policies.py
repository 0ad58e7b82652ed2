"""Replay policies: which row a full buffer replaces and how rows are drawn, by name.

A policy is built by the buffer from its capacity and ``alpha`` each time it (re)reads the file;
it holds no durable state of its own (scores live in the ``rows`` table, the RNG in the buffer),
so a reopened buffer samples exactly as one never closed. Every policy admits with the buffer's
algorithm R draw ``j`` (uniform over the whole stream); they differ in:

- ``victim(j)``: the slot that an admitted item replaces;
- ``draw(rng, size, k)``: ``k`` distinct slots among the ``size`` filled ones;
- ``scored``: whether it indexes the rows' scores (then ``load`` gets every row's score on open
  and ``scores_changed`` each new or refreshed one, before any ``victim`` or ``draw``).

``reservoir``: the victim is ``j`` (Vitter's algorithm R), sampling is uniform.
``priority``: sampling probability proportional to ``(max(score, 0) + eps) ** alpha`` (``alpha =
0`` is uniform, larger is greedier); the victim is the row with the LOWEST last score (the
best-learned one, least useful to replay), ties to the lowest slot. Its two-level sum/min tree
over slots (:class:`_SlotIndex`) makes sampling and eviction a few numpy calls over
O(sqrt(capacity)) numbers instead of a scan of the table.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from herllm.registry import Registry

PRIORITY_EPS = 1e-6  # keeps zero-loss rows sampleable

REPLAY_POLICIES: Registry[type] = Registry("replay policy")


def register_replay_policy(name: str) -> Callable[[type], type]:
    """Class decorator: register a replay policy (see the module docstring) as `name`, the value
    of replay.policy; it is built as ``cls(capacity, alpha)``."""

    def deco(cls: type) -> type:
        REPLAY_POLICIES.add(name, cls)
        return cls

    return deco


def replay_policy_names() -> tuple[str, ...]:
    """Every registered replay policy (the choices of replay.policy), in registration order."""
    return REPLAY_POLICIES.names()


def _uniform(rng: np.random.Generator, size: int, k: int) -> list[int]:
    return rng.choice(size, size=k, replace=False).tolist()


class _SlotIndex:
    """Two-level sum/min tree over slots, for priority sampling and lowest-score eviction.

    Leaves (priority and score per slot) live in blocks of ``block`` ~ sqrt(capacity)
    slots, with one sum and one min per block. Each operation is a few numpy calls over
    O(sqrt(capacity)) numbers (about 1k at 1M rows), which beats a binary sum-tree walked
    level by level in Python at these sizes. Block aggregates are recomputed from their
    leaves, never updated by deltas, so no floating-point drift accumulates.
    """

    def __init__(self, capacity: int) -> None:
        self.block = max(64, 1 << math.isqrt(capacity).bit_length())
        n_blocks = -(-capacity // self.block)
        self.prio = np.zeros(n_blocks * self.block)  # empty slots are never sampled
        self.score = np.full(n_blocks * self.block, np.inf)  # ... and never evicted
        self.rebuild()

    def rebuild(self) -> None:
        """Recompute every block aggregate from the leaves (used on open)."""
        self.block_sum = self.prio.reshape(-1, self.block).sum(axis=1)  # (n_blocks,)
        self.block_min = self.score.reshape(-1, self.block).min(axis=1)  # (n_blocks,)

    def set(self, slots: np.ndarray, prio: np.ndarray, score: np.ndarray) -> None:
        self.prio[slots], self.score[slots] = prio, score
        blocks = np.unique(slots // self.block)
        self.block_sum[blocks] = self.prio.reshape(-1, self.block)[blocks].sum(axis=1)
        self.block_min[blocks] = self.score.reshape(-1, self.block)[blocks].min(axis=1)

    def find(self, v: np.ndarray) -> np.ndarray:
        """Slots drawn proportionally to priority, one per uniform ``v`` in [0, 1)."""
        cum = np.cumsum(self.block_sum)  # (n_blocks,)
        u = v * cum[-1]  # (m,)
        b = np.minimum(np.searchsorted(cum, u, side="right"), len(cum) - 1)  # (m,)
        rest = u - (cum[b] - self.block_sum[b])  # position inside block b
        within = np.cumsum(self.prio.reshape(-1, self.block)[b], axis=1)  # (m, block)
        i = np.minimum((within <= rest[:, None]).sum(axis=1), self.block - 1)  # (m,)
        return b * self.block + i

    def argmin(self) -> int:
        """Slot with the lowest score; ties go to the lowest slot."""
        b = int(np.argmin(self.block_min))
        return b * self.block + int(np.argmin(self.score[b * self.block : (b + 1) * self.block]))


@register_replay_policy("reservoir")
class Reservoir:
    """Uniform over everything seen: algorithm R's victim, uniform draws."""

    scored = False

    def __init__(self, capacity: int, alpha: float) -> None:
        self.capacity = capacity

    def load(self, slots: np.ndarray, scores: np.ndarray) -> None:
        return None

    def scores_changed(self, slots: np.ndarray, scores: np.ndarray) -> None:
        return None

    def victim(self, j: int) -> int:
        return j

    def draw(self, rng: np.random.Generator, size: int, k: int) -> list[int]:
        return _uniform(rng, size, k)


@register_replay_policy("priority")
class Priority:
    """Draws proportional to ``(max(score, 0) + eps) ** alpha``; replaces the lowest score."""

    scored = True

    def __init__(self, capacity: int, alpha: float) -> None:
        self.alpha = alpha
        self.index = _SlotIndex(capacity)

    def priority(self, scores: np.ndarray) -> np.ndarray:
        p = (np.maximum(scores, 0.0) + PRIORITY_EPS) ** self.alpha
        return np.maximum(p, np.finfo(np.float64).tiny)  # huge alpha must not zero a row

    def load(self, slots: np.ndarray, scores: np.ndarray) -> None:
        self.index.prio[slots] = self.priority(scores)
        self.index.score[slots] = scores
        self.index.rebuild()

    def scores_changed(self, slots: np.ndarray, scores: np.ndarray) -> None:
        self.index.set(slots, self.priority(scores), scores)

    def victim(self, j: int) -> int:
        return self.index.argmin()

    def draw(self, rng: np.random.Generator, size: int, k: int) -> list[int]:
        return _uniform(rng, size, k) if k == size else self._draw(rng, k)

    def _draw(self, rng: np.random.Generator, k: int) -> list[int]:
        """k distinct slots, drawn one after another proportionally to priority.

        Drawing with replacement and skipping repeats is exactly sequential sampling
        without replacement. If a few rows hold most of the mass, repeats get common, so
        from the 4th round on the rows already chosen are zeroed (and restored after).
        """
        index, chosen, zeroed, saved = self.index, {}, [], []
        for round_ in range(64):
            if len(chosen) == k:
                break
            if round_ >= 4:
                done = set(zeroed)
                fresh = np.array([s for s in chosen if s not in done], dtype=np.int64)
                saved.append(index.prio[fresh].copy())
                index.set(fresh, np.zeros(len(fresh)), index.score[fresh])
                zeroed.extend(fresh.tolist())
            for slot in index.find(rng.random(2 * (k - len(chosen)))).tolist():
                # prio 0: an empty or zeroed slot hit through float rounding at a block edge
                if len(chosen) < k and slot not in chosen and index.prio[slot] > 0:
                    chosen[slot] = None
        else:
            raise RuntimeError(f"ReplayBuffer: priority sampling found {len(chosen)} of {k} rows")
        if zeroed:
            index.set(np.array(zeroed), np.concatenate(saved), index.score[zeroed])
        return list(chosen)
