"""The ledger's per-unit reservoir: a uniform sample of the unit, each window with its stream index."""

from __future__ import annotations

import numpy as np
import torch

from herllm.memory.ledger import Ledger


def windows(start: int, n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Windows whose token ids spell their own stream index."""
    return [(np.full(4, i), np.ones(4, dtype=bool)) for i in range(start, start + n)]


def test_reservoir_indices_follow_replaced_windows_and_split_at_the_change_point(tmp_path):
    ledger = Ledger(tmp_path, reservoir_size=16, seed=0)
    ledger.open_unit(0, 0, None)
    for start in range(0, 400, 8):  # 25x the reservoir: most slots are replaced
        ledger.observe(windows(start, 8), np.ones(8, dtype=bool), torch.zeros(8, 3))
    unit = ledger.current
    assert len(unit.reservoir) == 16
    assert [int(w[0][0]) for w in unit.reservoir] == unit.reservoir_index
    assert max(unit.reservoir_index) >= 200  # replacements happened late in the unit
    before, after = unit.split_at(200)
    assert before and after
    assert all(int(w[0][0]) < 200 for w in before)
    assert all(int(w[0][0]) >= 200 for w in after)
