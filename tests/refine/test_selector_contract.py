"""Contract tests over every registered selector, built from config as the loop builds them."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from herllm.config import SelectConfig, build_config
from herllm.refine.select import SELECTORS, build_selector, selector_from_config, selector_names

NAMES = selector_names()
CFG = {"fraction": 0.4, "window": 24, "warmup": 8}  # small: the threshold moves within the test


def make(name: str):
    return selector_from_config(SelectConfig(policy=name, **CFG))


def scores(n_batches: int = 12, batch: int = 4) -> list[np.ndarray]:
    """A fixed score stream with a jump in the middle (a new region)."""
    rng = np.random.default_rng(0)
    return [rng.normal(2.0 + (i >= n_batches // 2), 0.3, batch) for i in range(n_batches)]


def through_checkpoint(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_every_registered_name_is_a_config_choice():
    assert set(NAMES) >= {"all", "uncertain"}
    for name in NAMES:
        assert build_config(None, [f"select.policy={name}"]).select.policy == name
        assert isinstance(make(name), SELECTORS.get(name).cls)


def test_build_selector_matches_the_config_builder():
    for name in NAMES:
        a, b = build_selector(name, **CFG), make(name)
        for s in scores():
            assert np.array_equal(a.select(s), b.select(s))


def test_an_unknown_policy_is_one_clear_error():
    with pytest.raises(ValueError, match="select.policy='greedy' is not allowed; choose one of"):
        build_selector("greedy", **CFG)


@pytest.mark.parametrize("name", NAMES)
def test_selects_a_boolean_mask_per_experience(name):
    sel = make(name)
    for s in scores():
        mask = sel.select(s)
        assert mask.dtype == bool and mask.shape == s.shape


@pytest.mark.parametrize("name", NAMES)
def test_state_round_trip(name):
    sel = make(name)
    fresh = make(name)
    fresh.load_state_dict(through_checkpoint(sel.state_dict()))
    assert fresh.state_dict() == sel.state_dict()
    for s in scores()[:5]:
        sel.select(s)
    fresh = make(name)
    fresh.load_state_dict(through_checkpoint(sel.state_dict()))
    assert fresh.state_dict() == sel.state_dict()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("resume_at", [2, 7])
def test_resumed_midway_selects_as_uninterrupted(name, resume_at):
    straight, resumed = make(name), make(name)
    for i, s in enumerate(scores()):
        if i == resume_at:
            state = through_checkpoint(resumed.state_dict())
            resumed = make(name)
            resumed.load_state_dict(state)
        assert np.array_equal(resumed.select(s), straight.select(s)), i
    assert resumed.state_dict() == straight.state_dict()
