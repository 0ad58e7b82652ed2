"""Reptile meta-experience replay: interpolation math, no-op, optimizer moments, state."""

from __future__ import annotations

import io

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from herllm.update.meta import Reptile
from herllm.update.regularizers import snapshot, trainable_params


@pytest.fixture
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=32,
    )
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    return get_peft_model(LlamaForCausalLM(config), lora)


def batch(seed: int) -> dict:
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def run(model, reptile: Reptile, opt, steps: int, seed0: int = 0) -> list[bool]:
    fired = []
    for s in range(steps):
        opt.zero_grad()
        model(**batch(seed0 + s)).loss.backward()
        opt.step()
        fired.append(reptile.after_step(model, opt))
    return fired


def test_interpolates_exactly_every_k_steps(model):
    reptile = Reptile(every=3, epsilon=0.25)
    reptile.attach(model)
    anchor = {n: t.double() for n, t in snapshot(model).items()}
    opt = torch.optim.SGD(list(trainable_params(model).values()), lr=0.1)
    assert run(model, reptile, opt, 2) == [False, False]
    # Third step by hand, to know theta just before the meta-step.
    opt.zero_grad()
    model(**batch(2)).loss.backward()
    opt.step()
    before = {n: t.double() for n, t in snapshot(model).items()}
    assert reptile.after_step(model, opt) is True
    for name, p in trainable_params(model).items():
        expected = anchor[name] + 0.25 * (before[name] - anchor[name])
        torch.testing.assert_close(p.detach().double(), expected, rtol=0, atol=1e-7)
        assert torch.equal(reptile.anchor[name], p.detach())  # anchor moved to theta
    frozen_before = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert run(model, reptile, opt, 3, seed0=10) == [False, False, True]
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen_before[n])  # the base model is never touched


def test_epsilon_one_is_a_no_op(model):
    reptile = Reptile(every=1, epsilon=1.0)
    reptile.attach(model)
    opt = torch.optim.SGD(list(trainable_params(model).values()), lr=0.1)
    model(**batch(0)).loss.backward()
    opt.step()
    before = snapshot(model)
    assert reptile.after_step(model, opt) is True
    for name, p in trainable_params(model).items():
        assert torch.equal(p.detach(), before[name])


def test_resets_first_moment_keeps_second(model):
    reptile = Reptile(every=2, epsilon=0.5)
    reptile.attach(model)
    params = list(trainable_params(model).values())
    opt = torch.optim.AdamW(params, lr=1e-2)
    run(model, reptile, opt, 1)
    opt.zero_grad()
    model(**batch(7)).loss.backward()
    opt.step()
    exp_avg_sq = [opt.state[p]["exp_avg_sq"].clone() for p in params]
    steps = [opt.state[p]["step"].clone() for p in params]
    assert any(opt.state[p]["exp_avg"].abs().sum() > 0 for p in params)
    assert reptile.after_step(model, opt) is True
    for p, sq, st in zip(params, exp_avg_sq, steps, strict=True):
        assert torch.count_nonzero(opt.state[p]["exp_avg"]) == 0
        assert torch.equal(opt.state[p]["exp_avg_sq"], sq)
        assert torch.equal(opt.state[p]["step"], st)


def test_state_round_trips_exactly(model):
    reptile = Reptile(every=3, epsilon=0.3)
    reptile.attach(model)
    opt = torch.optim.SGD(list(trainable_params(model).values()), lr=0.1)
    run(model, reptile, opt, 4)
    buffer = io.BytesIO()
    torch.save(reptile.state_dict(), buffer)
    buffer.seek(0)
    fresh = Reptile(every=3, epsilon=0.3)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert fresh.steps == 4
    # Continue both on identical copies of the model: same meta-step at the same time.
    twin = {n: p.detach().clone() for n, p in trainable_params(model).items()}
    run(model, reptile, opt, 2)
    after_original = snapshot(model)
    with torch.no_grad():
        for n, p in trainable_params(model).items():
            p.copy_(twin[n])
    run(model, fresh, torch.optim.SGD(list(trainable_params(model).values()), lr=0.1), 2)
    for n, p in trainable_params(model).items():
        assert torch.equal(p.detach(), after_original[n])


def test_misuse_is_a_clear_error(model):
    with pytest.raises(ValueError, match="attach"):
        Reptile().after_step(model)
    with pytest.raises(ValueError, match="epsilon"):
        Reptile(epsilon=0.0)
    with pytest.raises(ValueError, match="every"):
        Reptile(every=0)
