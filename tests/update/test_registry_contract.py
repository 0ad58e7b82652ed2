"""Contract tests over every registered regularizer, built from config as the loop builds them.

The table is the registry itself (one row per registered name, default config) plus the config
variants listed in VARIANTS; a newly registered regularizer gets every test here for free.
"""

from __future__ import annotations

import copy
import io
from dataclasses import dataclass, field

import pytest
import torch
from test_regularizers import domain_batch, perturb, tiny_lora_llama, train_steps

from herllm.config import ProtectConfig, build_config
from herllm.update.protection import Protection
from herllm.update.registry import (
    REGULARIZERS,
    build_regularizer,
    needs_full_grads,
    regularizer_names,
)
from herllm.update.regularizers import Regularizer, trainable_params


@dataclass(frozen=True)
class Row:
    name: str
    config: dict = field(default_factory=dict)
    """ProtectConfig values (besides regularizers=[name])."""
    anchor_is_base: bool = False
    """The reference is the base model: the adapter must be at zero (lora_B = 0) to be at it."""

    @property
    def id(self) -> str:
        return "-".join([self.name, *(f"{k}={v}" for k, v in self.config.items())])

    def make(self) -> Regularizer:
        cfg = ProtectConfig(regularizers=[self.name], **self.config)
        return build_regularizer(self.name, cfg)


VARIANTS = [Row("kl", {"kl_reference": "base"}, anchor_is_base=True)]
ROWS = [Row(name) for name in regularizer_names()] + VARIANTS


def test_every_registered_name_is_a_config_choice_and_builds():
    assert set(regularizer_names()) >= {"ewc", "mas", "si", "kl"}
    for name in regularizer_names():
        cfg = build_config(None, [f"protect.regularizers=[{name}]"])
        assert isinstance(Protection(cfg.protect).regs[name], REGULARIZERS.get(name).cls)


def test_needs_full_grads_is_read_from_the_registry():
    assert needs_full_grads(["si"]) and needs_full_grads(["ewc", "si"])
    assert not needs_full_grads([]) and not needs_full_grads(["ewc", "mas", "kl"])


def test_kl_reference_comes_from_config_through_the_entry():
    assert Row("kl", {"kl_reference": "base"}).make().reference == "base"
    assert Row("kl").make().reference == ProtectConfig().kl_reference


@pytest.fixture
def model_and_batches():
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    return tiny_lora_llama(), [domain_batch(1, 4, gen) for _ in range(3)]


def to_anchor(row: Row, model) -> None:
    if row.anchor_is_base:  # lora_B = 0: the adapted model is the base model
        with torch.no_grad():
            for name, p in trainable_params(model).items():
                if "lora_B" in name:
                    p.zero_()


def assert_same_state(a, b) -> None:
    """Nested dicts/lists of tensors and plain values, equal exactly."""
    assert type(a) is type(b)
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same_state(a[k], b[k])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same_state(x, y)
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    else:
        assert a == b


def through_checkpoint(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)  # the path a checkpoint takes
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.id)
def test_satisfies_protocol(row):
    assert isinstance(row.make(), Regularizer)


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.id)
def test_penalty_is_zero_and_constant_before_the_first_consolidation(row, model_and_batches):
    model, batches = model_and_batches
    reg = row.make()
    train_steps(model, [reg], batches, batches[0], steps=3)
    perturb(model)
    pen = reg.penalty(model, batch=batches[0])
    assert pen.item() == 0.0
    assert not pen.requires_grad  # Protection skips terms without grad: nothing to weigh yet


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.id)
def test_penalty_is_zero_at_the_anchor(row, model_and_batches):
    model, batches = model_and_batches
    reg = row.make()
    train_steps(model, [reg], batches, batches[0], steps=3)
    to_anchor(row, model)
    reg.consolidate(model, batches[:2])
    assert reg.penalty(model, batch=batches[1]).item() == pytest.approx(0.0, abs=1e-7)
    perturb(model)
    assert reg.penalty(model, batch=batches[1]).item() > 0.0


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.id)
def test_state_round_trip_before_and_after_consolidation(row, model_and_batches):
    model, batches = model_and_batches
    reg = row.make()
    fresh = row.make()
    fresh.load_state_dict(through_checkpoint(reg.state_dict()))  # before any consolidation
    assert_same_state(fresh.state_dict(), reg.state_dict())
    train_steps(model, [reg], batches, batches[0], steps=3)
    reg.consolidate(model, batches[:2])
    train_steps(model, [reg], batches, batches[0], steps=2)  # SI: omega mid-unit is state too
    fresh = row.make()
    fresh.load_state_dict(through_checkpoint(reg.state_dict()))
    assert_same_state(fresh.state_dict(), reg.state_dict())
    perturb(model, seed=4)
    assert (
        fresh.penalty(model, batch=batches[2]).item() == reg.penalty(model, batch=batches[2]).item()
    )


def run_sequence(row, model, batches, reg, resume_at: int | None = None):
    """Steps and consolidations as a run makes them; at `resume_at` the regularizer is replaced
    by a fresh one loaded from its checkpointed state (a crash and resume)."""
    plan = ["steps", "consolidate", "steps", "steps", "consolidate", "steps"]
    for i, what in enumerate(plan):
        if i == resume_at:
            state = through_checkpoint(reg.state_dict())
            reg = row.make()
            reg.load_state_dict(state)
        if what == "steps":
            train_steps(model, [reg], batches, batches[i % 3], steps=2)
        else:
            reg.consolidate(model, batches[:2])
    return reg


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.id)
@pytest.mark.parametrize("resume_at", [1, 3])
def test_resumed_midway_ends_equal_to_uninterrupted(row, resume_at, model_and_batches):
    model, batches = model_and_batches
    twin = copy.deepcopy(model)
    straight = run_sequence(row, model, batches, row.make())
    resumed = run_sequence(row, twin, batches, row.make(), resume_at=resume_at)
    assert_same_state(resumed.state_dict(), straight.state_dict())
    for (n, p), (m, q) in zip(model.named_parameters(), twin.named_parameters(), strict=True):
        assert n == m and torch.equal(p, q), n
    assert (
        resumed.penalty(twin, batch=batches[0]).item()
        == straight.penalty(model, batch=batches[0]).item()
    )
