"""Golden tests of the knowledge benchmark's metrics against hand-computed values."""

import math

import numpy as np
import pytest

from herllm.evaluate.knowledge import (
    exact_match,
    fold,
    ratio,
    recall_at_k,
    relative_drop,
    target_nll,
)


def test_fold_and_exact_match():
    assert fold("  Malm Town’s  cultural-HUB!") == "malm town s cultural hub"
    assert exact_match(" 2030. In the heart of", "2030")
    assert exact_match("Malm town's Cultural Hub, where", "Malm Town's cultural hub")
    assert not exact_match(" 20301 was", "2030")  # a word boundary after the target
    assert not exact_match(" in 2030", "2030")  # the answer must come first
    assert exact_match("Sweden", "Sweden.")
    assert not exact_match("anything", "")


def test_target_nll_golden():
    # row 0: p(target=1) = 3/4 -> ln(4/3); row 1: uniform over 4 -> ln 4
    logits = np.array([[0.0, math.log(3.0), -np.inf, -np.inf], [1.0, 1.0, 1.0, 1.0]])
    assert target_nll(logits, [1, 2]) == pytest.approx((math.log(4 / 3) + math.log(4)) / 2)


def test_recall_at_k_golden():
    retrieved = [["a", "b"], ["b", "a"], ["c", "c"]]
    truth = ["a", "a", "a"]
    assert recall_at_k(retrieved, truth, 1) == pytest.approx(1 / 3)
    assert recall_at_k(retrieved, truth, 2) == pytest.approx(2 / 3)
    assert math.isnan(recall_at_k([], [], 1))


def test_drop_and_ratio_golden():
    assert relative_drop(0.8, 0.6) == pytest.approx(0.25)
    assert relative_drop(0.5, 0.6) == pytest.approx(-0.2)
    assert math.isnan(relative_drop(0.0, 0.1))
    assert ratio(0.45, 0.5) == pytest.approx(0.9)
    assert math.isnan(ratio(1.0, 0.0))
