"""Statistics of representations for shift detection: running moments, a unit's diagonal
Gaussian, and the CUSUM change point."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import Tensor


class _RepStats:
    """Running mean (H,) and total sum of squared deviations of representations, float64."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: Tensor | None = None
        self.m2 = 0.0

    def add(self, x: Tensor) -> None:  # x: (N, H)
        if x.shape[0] == 0:
            return
        n, mean = x.shape[0], x.mean(0)  # (H,)
        m2 = float((x - mean).pow(2).sum())
        if self.mean is None:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        total = self.count + n
        delta = mean - self.mean  # Chan et al. parallel merge
        self.m2 += m2 + float(delta.pow(2).sum()) * self.count * n / total
        self.mean = self.mean + delta * (n / total)
        self.count = total

    def total_variance(self) -> float:
        return self.m2 / max(self.count - 1, 1)


@dataclass
class _RepModel:
    """A unit's representations as a diagonal Gaussian: the ``rep`` channel is each sample's
    log mean squared standardised distance to it."""

    center: np.ndarray  # (H,)
    scale: np.ndarray  # (H,)
    floor: float  # added to every dimension's spread: few samples, many dimensions

    @classmethod
    def of(cls, reps: np.ndarray) -> _RepModel:
        """Mean and floored per-dimension spread of ``reps`` (n, H)."""
        spread = reps.std(0)
        floor = 0.1 * float(spread.mean()) + 1e-12
        return cls(reps.mean(0), spread + floor, floor)

    @classmethod
    def fit(cls, reps: np.ndarray) -> tuple[_RepModel, np.ndarray]:
        """The model of ``reps`` (n, H) and each one's leave-one-out channel value: in-sample
        distances are smaller than a new sample's, and would make the unit's own look far."""
        model, n = cls.of(reps), len(reps)
        s1, s2 = reps.sum(0), (reps**2).sum(0)
        loo_mean = (s1 - reps) / (n - 1)  # (n, H) mean without sample i
        loo_var = np.maximum((s2 - reps**2) / (n - 1) - loo_mean**2, 0.0) * (n - 1) / max(n - 2, 1)
        loo_z = (reps - loo_mean) / (np.sqrt(loo_var) + model.floor)
        return model, np.log((loo_z**2).mean(1) + 1e-12)

    def standardise(self, reps: np.ndarray) -> np.ndarray:
        return (reps - self.center) / self.scale

    def log_distance(self, reps: np.ndarray) -> np.ndarray:
        return np.log((self.standardise(reps) ** 2).mean(1) + 1e-12)


def _change_point(z: np.ndarray) -> int:
    """CUSUM estimate of a single mean change in ``z`` (n,) or (n, D): the first index after it."""
    z = z.reshape(len(z), -1)
    n = len(z)
    if n < 2:
        return 0
    k = np.arange(1, n)  # split points: z[:k] before, z[k:] after
    cusum = np.cumsum(z, 0)[:-1]  # (n-1, D) S_k
    # Standardised bridge (the max-t split): plain CUSUM drifts far back when, as here, the
    # new region is a short tail after a long history.
    t = ((cusum - np.outer(k / n, z.sum(0))) ** 2).sum(1) / (k * (n - k) / n)
    return int(k[np.argmax(t)])


def _standardised_reps(reps: np.ndarray, reference: int) -> np.ndarray:
    """(n, H) reps in units of the per-dimension spread of the first ``reference`` ones, each
    sample's norm capped at twice the typical one (one odd document must not look like a change)."""
    reference = max(reference, 2)
    z = _RepModel.of(reps[:reference]).standardise(reps)
    norm = np.linalg.norm(z, axis=1, keepdims=True)  # (n, 1)
    cap = 2.0 * float(np.median(norm[:reference]))
    return z * np.minimum(1.0, cap / np.maximum(norm, 1e-12))
