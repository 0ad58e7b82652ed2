"""Contract tests over every registered replay policy: a reopened buffer samples exactly as one
that was never closed (same seed, same operations)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from herllm.config import build_config
from herllm.memory.policies import REPLAY_POLICIES, replay_policy_names
from herllm.memory.replay import POLICIES, BufferItem, ReplayBuffer

NAMES = replay_policy_names()
CAPACITY = 16


def items(start: int, n: int) -> tuple[list[BufferItem], list[float]]:
    rng = np.random.default_rng(start)
    batch = [BufferItem(f"d{start + i}", 0, rng.integers(0, 50, 6)) for i in range(n)]
    return batch, rng.uniform(0.0, 4.0, n).tolist()


def operations(buf: ReplayBuffer, phase: int) -> list[list[int]]:
    """One phase of a run: add (past capacity, so the policy picks victims), sample, rescore."""
    drawn = []
    for k in range(4):
        batch, scores = items(100 * phase + 10 * k, 7)
        buf.add(batch, scores, step=10 * phase + k)
        rows = buf.sample(5)
        drawn.append([r.row_id for r in rows])
        buf.update_scores([r.row_id for r in rows], [0.5 * (j + k) for j in range(len(rows))])
    return drawn


def test_every_registered_name_is_a_config_choice():
    assert set(NAMES) >= {"reservoir", "priority"} and set(POLICIES) <= set(NAMES)
    for name in NAMES:
        assert build_config(None, [f"replay.policy={name}"]).replay.policy == name
        assert REPLAY_POLICIES.get(name)(CAPACITY, 1.0).scored in (True, False)


@pytest.mark.parametrize("name", NAMES)
def test_sampling_after_reopen_equals_sampling_without_reopen(tmp_path: Path, name):
    straight = ReplayBuffer(tmp_path / "a.sqlite", CAPACITY, name, seed=3, alpha=1.5)
    reopened = ReplayBuffer(tmp_path / "b.sqlite", CAPACITY, name, seed=3, alpha=1.5)
    assert operations(straight, 0) == operations(reopened, 0)
    straight.commit(step=1)
    reopened.commit(step=1)
    reopened.close()
    reopened = ReplayBuffer.open(tmp_path / "b.sqlite")
    assert operations(straight, 1) == operations(reopened, 1)
    assert straight.counters() == reopened.counters() and len(straight) == len(reopened)
    straight.close()
    reopened.close()


@pytest.mark.parametrize("name", NAMES)
def test_uncommitted_operations_are_undone_by_reopen(tmp_path: Path, name):
    buf = ReplayBuffer(tmp_path / "c.sqlite", CAPACITY, name, seed=5)
    operations(buf, 0)
    buf.commit(step=1)
    expected = operations(buf, 1)
    buf.close()  # phase 1 was never committed: a crash
    again = ReplayBuffer.open(tmp_path / "c.sqlite")
    assert operations(again, 1) == expected
    again.close()
