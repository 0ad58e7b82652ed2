"""Contract tests for every regularizer, driven by one table of cases; DynamicStrength."""

from __future__ import annotations

import copy
import io
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from herllm.update.regularizers import (
    MAS,
    SI,
    KLAnchor,
    OnlineEWC,
    Regularizer,
    trainable_params,
)
from herllm.update.strength import DynamicStrength

VOCAB_USED = 16  # the synthetic domains use tokens 0..15 of the 64-token vocabulary


def tiny_lora_llama(seed: int = 0) -> torch.nn.Module:
    """Hidden 32, 2 layers, vocab 64; init range 0.2 so a frozen lm_head can express peaks."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=32,
        initializer_range=0.2,
    )
    lora = LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
    )
    return get_peft_model(LlamaForCausalLM(config), lora)


def domain_batch(stride: int, n: int, gen: torch.Generator, length: int = 12) -> dict:
    """A synthetic 'domain': arithmetic token progressions start, start+stride, ... mod 16."""
    start = torch.randint(0, VOCAB_USED, (n, 1), generator=gen)
    ids = (start + stride * torch.arange(length)) % VOCAB_USED  # (n, T)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


@dataclass(frozen=True)
class Case:
    name: str
    make: Callable[[], Regularizer]
    protects_learned_domain: bool = True  # False: the reference is not what was learned
    anchor_is_base: bool = False  # True: the reference is the base model (lora_B = 0)


CASES = [
    Case("ewc", lambda: OnlineEWC(gamma=0.9)),
    Case("mas", lambda: MAS(gamma=0.9)),
    Case("si", lambda: SI(xi=1e-3, gamma=0.9)),
    Case("kl_last", lambda: KLAnchor("last", temperature=2.0)),
    Case("kl_base", lambda: KLAnchor("base"), protects_learned_domain=False, anchor_is_base=True),
]
IDS = [c.name for c in CASES]


def train_steps(model, regs, batches, anchor_batch, steps, lr=3e-2, strength=None):
    """The loop's calling convention, trimmed to what the regularizers see."""
    opt = torch.optim.Adam(list(trainable_params(model).values()), lr=lr)
    for step in range(steps):
        batch = batches[step % len(batches)]
        lm = model(**batch).loss
        loss = lm
        for i, reg in enumerate(regs):
            pen = reg.penalty(model, batch=anchor_batch)
            w = 1.0 if strength is None else strength.weight(str(i), pen, lm)
            loss = loss + w * pen
        opt.zero_grad()
        loss.backward()
        for reg in regs:
            reg.after_backward(model)
        opt.step()
        for reg in regs:
            reg.after_step(model)


@pytest.fixture
def setup():
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    model = tiny_lora_llama()
    batches = [domain_batch(1, 4, gen) for _ in range(3)]
    return model, batches


def consolidated(case: Case, model, batches) -> Regularizer:
    """A regularizer after a few loop steps and one consolidation (so SI has a path)."""
    reg = case.make()
    train_steps(model, [reg], batches, batches[0], steps=4)
    if case.anchor_is_base:  # put the adapter where the reference is: lora_B = 0 is the base
        with torch.no_grad():
            for name, p in trainable_params(model).items():
                if "lora_B" in name:
                    p.zero_()
    reg.consolidate(model, batches[:2])
    return reg


def perturb(model, scale: float = 0.05, seed: int = 1) -> dict[str, torch.Tensor]:
    """Move every trainable parameter; returns the displacement."""
    gen = torch.Generator().manual_seed(seed)
    moves = {}
    with torch.no_grad():
        for name, p in trainable_params(model).items():
            moves[name] = scale * torch.randn(p.shape, generator=gen)
            p.add_(moves[name])
    return moves


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_satisfies_protocol(case):
    assert isinstance(case.make(), Regularizer)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_penalty_exactly_zero_before_first_consolidation(case, setup):
    model, batches = setup
    reg = case.make()
    train_steps(model, [reg], batches, batches[0], steps=3)
    perturb(model)
    assert reg.penalty(model, batch=batches[0]).item() == 0.0


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_penalty_positive_after_parameters_move(case, setup):
    model, batches = setup
    reg = consolidated(case, model, batches)
    before = reg.penalty(model, batch=batches[0]).item()
    perturb(model)
    after = reg.penalty(model, batch=batches[0]).item()
    assert after > 0.0
    assert after > before


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_penalty_gradient_points_back_to_anchor(case, setup):
    model, batches = setup
    reg = consolidated(case, model, batches)
    moves = perturb(model, scale=0.02)
    params = trainable_params(model)
    pen = reg.penalty(model, batch=batches[0])
    grads = torch.autograd.grad(pen, list(params.values()), allow_unused=True)
    inner = sum((g * moves[n]).sum() for n, g in zip(params, grads, strict=True) if g is not None)
    assert inner.item() > 0.0  # -grad has a component back along -move, towards the anchor
    with torch.no_grad():  # and a small step down the gradient lowers the penalty
        for p, g in zip(params.values(), grads, strict=True):
            if g is not None:
                p.sub_(1e-3 * g / max(float(pen), 1e-12))
    assert reg.penalty(model, batch=batches[0]).item() < pen.item()


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_state_round_trips_exactly(case, setup):
    model, batches = setup
    reg = consolidated(case, model, batches)
    train_steps(model, [reg], batches, batches[0], steps=2)  # SI: omega mid-unit is state too
    buffer = io.BytesIO()
    torch.save(reg.state_dict(), buffer)  # the path a checkpoint takes
    buffer.seek(0)
    fresh = case.make()
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert (
        fresh.penalty(model, batch=batches[1]).item() == reg.penalty(model, batch=batches[1]).item()
    )
    # Both keep evolving identically: one more step and a second consolidation.
    train_steps(model, [reg, fresh], batches, batches[0], steps=1)
    reg.consolidate(model, batches[:1])
    fresh.consolidate(model, batches[:1])
    perturb(model, seed=3)
    assert (
        fresh.penalty(model, batch=batches[2]).item() == reg.penalty(model, batch=batches[2]).item()
    )


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_state_of_another_kind_is_rejected(case):
    wrong = {"kind": "NotARegularizer"}
    with pytest.raises(ValueError, match="kind"):
        case.make().load_state_dict(wrong)


@pytest.mark.parametrize(
    "case", [c for c in CASES if not c.make().needs_batch], ids=lambda c: c.name
)
def test_importance_and_anchor_live_on_parameter_dtype(case, setup):
    model, batches = setup
    model = model.double()
    double_batches = [dict(b) for b in batches]
    reg = consolidated(case, model, double_batches)
    state = reg.state_dict()
    tensors = list(state["importance"].values()) + list(state["anchor"].values())
    assert tensors and all(t.dtype == torch.float64 for t in tensors)
    assert set(state["anchor"]) == set(trainable_params(model))  # one copy each, no more


def test_kl_anchor_without_batch_after_consolidation_is_a_clear_error(setup):
    model, batches = setup
    reg = KLAnchor("last")
    reg.consolidate(model, [])
    with pytest.raises(ValueError, match="batch="):
        reg.penalty(model)


def test_si_after_step_without_after_backward_is_a_clear_error(setup):
    model, _ = setup
    with pytest.raises(ValueError, match="after_backward"):
        SI().after_step(model)


@pytest.mark.parametrize(
    "case", [c for c in CASES if not c.make().needs_batch], ids=lambda c: c.name
)
def test_frozen_parameters_keep_their_protection_until_they_train_again(case, setup):
    model, batches = setup
    reg = consolidated(case, model, batches)
    frozen = [n for n in trainable_params(model) if "layers.0." in n]
    before = reg.state_dict()
    for name, p in model.named_parameters():
        if name in frozen:
            p.requires_grad_(False)
    train_steps(model, [reg], batches, batches[0], steps=2)
    reg.consolidate(model, batches[:1])
    state = reg.state_dict()
    assert frozen and set(state["importance"]) == set(before["importance"]) == set(state["anchor"])
    for name in frozen:  # untouched while frozen: neither re-estimated nor re-anchored
        assert torch.equal(state["importance"][name], before["importance"][name])
        assert torch.equal(state["anchor"][name], before["anchor"][name])
    params = dict(model.named_parameters())
    with torch.no_grad():  # the frozen part moves (e.g. a rollback), then trains again
        for name in frozen:
            params[name].add_(0.05)
    assert float(reg.penalty(model)) == pytest.approx(0.0, abs=1e-12)  # frozen: no penalty
    for name in frozen:
        params[name].requires_grad_(True)
    assert float(reg.penalty(model)) > 0  # training again: protected against its old anchor


def test_ewc_rejects_batches_without_labels(setup):
    model, batches = setup
    unlabeled = [{**batches[0], "labels": torch.full_like(batches[0]["labels"], -100)}]
    with pytest.raises(ValueError, match="labels"):
        OnlineEWC().consolidate(model, unlabeled)


@pytest.mark.parametrize("name", ["ewc", "mas"])
def test_batched_per_sample_gradients_equal_the_per_sample_loop(name):
    """One batched pass (LoRA Linear weights) gives the importances of one pass per sample, with
    right padding and a sample with no labelled token in the batch."""
    from herllm.update import importance as r

    model = tiny_lora_llama(seed=0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)  # B = 0 at init would make every A gradient zero
    gen = torch.Generator().manual_seed(3)
    batch = domain_batch(1, 8, gen)
    batch["attention_mask"][3, 7:] = 0
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    batch["labels"][6] = -100
    batches = [batch, domain_batch(3, 3, gen)]
    objective, stat = {"ewc": (r._lm_loss, torch.square), "mas": (r._logit_sq_norm, torch.abs)}[
        name
    ]
    assert r._lora_pairs(model) is not None
    fast = r._lora_per_sample_grad_mean(model, batches, objective, stat, r._lora_pairs(model))
    slow = r._looped_per_sample_grad_mean(model, batches, objective, stat)
    assert fast.keys() == slow.keys() == trainable_params(model).keys()
    for k in slow:
        assert float(slow[k].abs().max()) > 0, k
        torch.testing.assert_close(
            fast[k], slow[k], rtol=1e-4, atol=1e-6 * float(slow[k].abs().max())
        )
    # a trainable parameter that is not a LoRA Linear weight: the per-sample loop is used
    next(p for n, p in model.named_parameters() if n.endswith("norm.weight")).requires_grad_(True)
    assert r._lora_pairs(model) is None


def learn_domain_a(regs: list) -> tuple[torch.nn.Module, list[dict]]:
    """60 steps on domain A (stride 1) with ``regs`` attached; returns the model and 2 replay batches."""
    gen = torch.Generator().manual_seed(2)
    model = tiny_lora_llama(seed=0)
    stream_a = [domain_batch(1, 8, gen) for _ in range(60)]
    train_steps(model, regs, stream_a, stream_a[0], steps=60, strength=DynamicStrength(1.0))
    return model, [domain_batch(1, 8, gen) for _ in range(2)]


STREAM_B = [domain_batch(5, 8, torch.Generator().manual_seed(3)) for _ in range(60)]
EVAL_A = domain_batch(1, 64, torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def naive_run() -> tuple[float, float]:
    """Domain A loss after learning A, and after then learning B with no protection."""
    torch.set_num_threads(1)
    model, _ = learn_domain_a([])
    after_a = a_loss(model)
    train_steps(model, [], STREAM_B, None, steps=60)
    return after_a, a_loss(model)


def a_loss(model) -> float:
    with torch.no_grad():
        return model(**EVAL_A).loss.item()


@pytest.mark.slow
@pytest.mark.parametrize(
    "case", [c for c in CASES if c.protects_learned_domain], ids=lambda c: c.name
)
def test_forgets_first_domain_less_than_naive(case, naive_run):
    loss_after_a, loss_naive = naive_run
    assert loss_naive - loss_after_a > 2.0  # the toy stream does cause forgetting
    reg = case.make()
    model, replay = learn_domain_a([reg])  # SI needs to see the path through A
    assert a_loss(model) == loss_after_a  # a zero penalty left training on A untouched
    reg.consolidate(model, replay)
    strength = DynamicStrength(target_ratio=1.0)
    train_steps(model, [reg], STREAM_B, replay[0], steps=60, strength=strength)
    forgetting = a_loss(model) - loss_after_a
    assert forgetting < 0.75 * (loss_naive - loss_after_a)


def test_dynamic_strength_holds_the_target_ratio_at_any_scale():
    for scale in (1e-6, 1.0, 1e4):
        ds = DynamicStrength(target_ratio=0.2, decay=0.9)
        gen = torch.Generator().manual_seed(0)
        for _ in range(300):
            lm = 3.0 + 0.1 * torch.randn((), generator=gen).item()
            pen = scale * (5.0 + 0.5 * torch.randn((), generator=gen).item())
            w = ds.weight("ewc", torch.tensor(pen), torch.tensor(lm))
        assert w * 5.0 * scale == pytest.approx(0.2 * 3.0, rel=0.05)


def test_dynamic_strength_is_zero_before_any_penalty_and_capped():
    ds = DynamicStrength(max_weight=100.0)
    assert ds.weight("ewc", 0.0, 2.0) == 0.0
    assert ds.weight("ewc", 1e-12, 2.0) == 100.0


def test_dynamic_strength_observe_moves_ratio_the_right_way_and_stays_bounded():
    ds = DynamicStrength(target_ratio=0.1, min_ratio=0.05, max_ratio=0.4, adapt_rate=0.5)
    assert ds.observe(old_loss_delta=0.2, new_loss_progress=0.1) > 0.1  # forgetting: protect
    ds = DynamicStrength(target_ratio=0.1, min_ratio=0.05, max_ratio=0.4, adapt_rate=0.5)
    assert ds.observe(old_loss_delta=0.0, new_loss_progress=-0.01) < 0.1  # stalled: loosen
    ds = DynamicStrength(target_ratio=0.1, min_ratio=0.05, max_ratio=0.4, adapt_rate=0.5)
    assert ds.observe(old_loss_delta=0.0, new_loss_progress=0.3) == 0.1  # healthy: hold
    for _ in range(20):
        ds.observe(1.0, 0.0)
    assert ds.ratio == 0.4
    for _ in range(20):
        ds.observe(0.0, 0.0)
    assert ds.ratio == 0.05


def test_dynamic_strength_state_round_trips():
    ds = DynamicStrength()
    for i in range(10):
        ds.weight("kl", 0.5 + i, 2.0)
    ds.observe(0.5, 0.0)
    fresh = DynamicStrength()
    fresh.load_state_dict(copy.deepcopy(ds.state_dict()))
    assert fresh.weight("kl", 1.0, 2.0) == ds.weight("kl", 1.0, 2.0)
    assert fresh.ratio == ds.ratio
