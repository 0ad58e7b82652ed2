"""Progressive expansion pieces: orthogonality penalty, routing keys, bank decisions, merging."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import tiny_lora_llama

from herllm.update import adapters as ad


def ids(seed: int, n: int = 4, t: int = 12, vocab: int = 64) -> dict:
    x = torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x}


def set_lora_a(model, name: str, rows: torch.Tensor) -> None:
    """Give every LoRA layer of adapter `name` the A matrix `rows` (r, d)."""
    with torch.no_grad():
        for layer in ad.lora_layers(model):
            if name in layer.lora_A:
                layer.lora_A[name].weight.copy_(rows)


def test_orthogonality_is_zero_for_orthogonal_subspaces_and_positive_otherwise():
    model = tiny_lora_llama()
    ad.add_adapter(model, "a001", model.peft_config["default"])
    eye = torch.eye(32)
    set_lora_a(model, "default", eye[:4])
    set_lora_a(model, "a001", eye[4:8])  # disjoint coordinates: orthogonal rows
    assert float(ad.orthogonality(model, "a001", ["default"])) == 0.0
    set_lora_a(model, "a001", eye[2:6])  # shares two directions with `default`
    overlap = float(ad.orthogonality(model, "a001", ["default"]))
    layers = len(ad.lora_layers(model))
    assert overlap == pytest.approx(2.0 * layers)  # |A_old A_new^T| has two unit entries per layer
    assert float(ad.orthogonality(model, "a001", [])) == 0.0


def test_training_with_the_penalty_reduces_the_overlap():
    def train(orth: bool) -> float:
        model = tiny_lora_llama(seed=1)
        ad.add_adapter(model, "a001", model.peft_config["default"])
        bank = ad.AdapterBank("a001", compose="sum")
        bank.register("default")
        ad.activate(model, bank)
        params = [p for p in model.parameters() if p.requires_grad]
        assert params and all("a001" in n for n, p in model.named_parameters() if p.requires_grad)
        opt = torch.optim.AdamW(params, lr=1e-2)
        strength = ad_strength()
        for step in range(40):
            out = model(**ids(step))
            loss = out.loss
            if orth:
                overlap = ad.orthogonality(model, "a001", ["default"])
                loss = loss + strength.weight("orth", overlap, out.loss) * overlap
            opt.zero_grad()
            loss.backward()
            opt.step()
        return float(ad.orthogonality(model, "a001", ["default"]))

    plain, penalised = train(False), train(True)
    assert penalised < 0.5 * plain


def ad_strength():
    from herllm.update.strength import DynamicStrength

    return DynamicStrength(target_ratio=0.5)


def summed_pair():
    """A tiny model with `default` frozen and `a001` training, both active (compose=sum)."""
    model = tiny_lora_llama()
    ad.add_adapter(model, "a001", model.peft_config["default"])
    bank = ad.AdapterBank("a001", compose="sum")
    bank.register("default")
    ad.activate(model, bank)
    return model, bank


def test_activate_sum_keeps_old_adapters_frozen_and_route_uses_one():
    model, bank = summed_pair()
    assert set(model.base_model.active_adapters) == {"default", "a001"}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".a001." in n for n in trainable)
    bank.compose = "route"
    ad.activate(model, bank)
    assert model.base_model.active_adapters == ["a001"]


def test_base_representations_leave_adapters_as_they_were():
    model, _ = summed_pair()
    with torch.no_grad():  # a001 changes the outputs (LoRA B starts at zero)
        for layer in ad.lora_layers(model):
            layer.lora_B["a001"].weight.normal_(0, 0.5)
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    batch = ids(1)
    adapted = model(**batch).logits
    reps = ad.base_reps(model, [batch])
    # PEFT re-enables (and un-freezes) every active adapter when `disable_adapter` ends.
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert torch.equal(model(**batch).logits, adapted)  # adapters are on again
    with model.disable_adapter():
        hidden = model(**batch, output_hidden_states=True).hidden_states[-1]
    assert torch.allclose(reps, hidden.mean(1), atol=1e-6)  # the base model's, adapters off
    assert not torch.allclose(
        reps, model(**batch, output_hidden_states=True).hidden_states[-1].mean(1)
    )


def clusters(seed: int, centre: float, n: int = 40, dim: int = 16) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = np.zeros(dim)
    c[seed % dim] = centre
    return c + rng.normal(0, 1.0, (n, dim))


def bank_with(keys: dict[str, np.ndarray], **kw) -> ad.AdapterBank:
    bank = ad.AdapterBank(next(iter(keys)), **kw)
    for name, reps in keys.items():
        bank.register(name)
        bank.add_key(ad.RoutingKey.fit(f"unit-{name}", name, reps, tokens=128))
    return bank


def test_routing_picks_the_right_adapter_and_far_inputs_use_the_fallback():
    a, b = clusters(0, 12.0), clusters(1, 12.0)
    bank = bank_with({"default": a, "a001": b})
    assert bank.route(clusters(0, 12.0, n=20) + 0) == ["default"] * 20
    assert bank.route(clusters(1, 12.0, n=20)) == ["a001"] * 20
    far = clusters(1, 60.0, n=10)  # far beyond a001's region, on its side
    assert (bank.keys["unit-a001"].ratio(far) > 10).all()
    assert bank.route(far) == ["a001"] * 10  # nearest: the most likely unit all the same
    recent = bank_with({"default": a, "a001": b}, fallback="recent")
    assert recent.current == "default" and recent.route(far) == ["default"] * 10  # trained last
    assert bank_with({"default": a, "a001": b}, fallback="base").route(far) == [ad.BASE] * 10
    near = clusters(1, 12.0, n=10)
    for fallback in ad.FALLBACKS:  # inputs inside the radius never see the fallback
        assert bank_with({"default": a, "a001": b}, fallback=fallback).route(near) == ["a001"] * 10


def test_the_radius_widens_for_inputs_shorter_than_the_key_windows():
    bank = bank_with({"default": clusters(0, 12.0), "a001": clusters(1, 12.0)}, fallback="base")
    key = bank.keys["unit-a001"]
    x = key.center + 4.0 * key.median * key.scale  # 4 median distances: beyond 2.5
    assert key.ratio(x[None])[0] == pytest.approx(4.0)
    assert bank.route(x[None]) == [ad.BASE]  # no lengths given: the radius as configured
    assert bank.route(x[None], tokens=[128]) == [ad.BASE]  # as long as the key's windows
    assert bank.route(x[None], tokens=[16]) == ["a001"]  # radius 2.5 * sqrt(128 / 16) = 7.1
    assert ad.widening(np.array([128.0, 128.0, 0.0]), [16, 512, 16]).tolist() == pytest.approx(
        [8**0.5, 1.0, 1.0]  # longer inputs keep the radius; keys of unknown length too
    )


def test_a_bank_without_keys_routes_to_the_adapter_in_training_unless_base():
    x = clusters(0, 12.0, n=3)
    assert ad.AdapterBank("a002").route(x) == ["a002"] * 3
    assert ad.AdapterBank("a002", fallback="recent").route(x) == ["a002"] * 3
    assert ad.AdapterBank("a002", fallback="base").route(x) == [ad.BASE] * 3
    with pytest.raises(ValueError, match="fallback='nearby'; choose one of nearest, recent, base"):
        ad.AdapterBank("a002", fallback="nearby")


def test_bank_state_saved_before_fallback_existed_loads_and_routes_nearest():
    bank = bank_with({"default": clusters(0, 12.0), "a001": clusters(1, 12.0)}, fallback="base")
    old = bank.state_dict()
    del old["fallback"]
    for key in old["keys"].values():
        del key["tokens"]
    again = ad.AdapterBank.from_state(old)
    assert again.fallback == "nearest" and {k.tokens for k in again.keys.values()} == {0.0}
    far = clusters(1, 60.0, n=4)
    assert again.route(far, tokens=[8] * 4) == ["a001"] * 4


def test_decide_reuses_a_recurring_region_and_grows_for_a_new_one():
    bank = bank_with({"default": clusters(0, 12.0), "a001": clusters(1, 12.0)})
    assert bank.decide(clusters(10, 0.0, n=16) + bank.keys["unit-a001"].center)[0] == "a001"
    adapter, ratio = bank.decide(clusters(7, 12.0, n=16))
    assert adapter is None and ratio > bank.reuse_radius


def test_key_fit_ignores_a_minority_from_the_previous_region():
    own, previous = clusters(0, 12.0, n=48), clusters(1, 12.0, n=12)
    clean = ad.RoutingKey.fit("u", "x", own)
    mixed = ad.RoutingKey.fit("u", "x", np.concatenate([previous, own]))
    assert np.linalg.norm(mixed.center - clean.center) < 1.0
    assert ad.RoutingKey.fit("u", "x", own).ratio(previous).min() > 2.0


def test_bank_state_round_trips():
    bank = bank_with({"default": clusters(0, 12.0), "a001": clusters(1, 12.0)})
    bank.grown = 1
    bank.fallback = "recent"
    again = ad.AdapterBank.from_state(bank.state_dict())
    x = clusters(3, 5.0, n=8)
    assert again.route(x) == bank.route(x) and again.adapters == bank.adapters
    assert again.fallback == "recent" and again.keys["unit-a001"].tokens == 128


def test_merge_is_exactly_the_sum_of_both_adapters():
    model = tiny_lora_llama(seed=2)
    ad.add_adapter(model, "a001", model.peft_config["default"])
    with torch.no_grad():  # PEFT starts B at zero; give both adapters a real delta
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.eval()
    batch = ids(9)
    model.base_model.set_adapter(["default", "a001"])
    both = model(input_ids=batch["input_ids"]).logits
    ad.merge_adapters(model, "default", "a001", "m001")
    assert set(model.peft_config) == {"m001"}
    model.base_model.set_adapter("m001")
    merged = model(input_ids=batch["input_ids"]).logits
    assert torch.allclose(both, merged, atol=1e-5)


def test_routed_model_mixes_adapters_in_one_batch():
    model = tiny_lora_llama(seed=3)
    ad.add_adapter(model, "a001", model.peft_config["default"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.eval()
    batch = ids(4, n=2)
    reps = ad.base_reps(model, [batch]).numpy()
    bank = ad.AdapterBank("default")
    bank.register("a001")
    for i, name in enumerate(("default", "a001")):  # each input is its own unit's centre
        bank.add_key(ad.RoutingKey(f"u{i}", name, reps[i], np.ones_like(reps[i]), 1.0, 1))
    routed = ad.RoutedModel(model, bank)
    out = routed(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert routed.last_routes == ["default", "a001"]
    for i, name in enumerate(("default", "a001")):
        model.base_model.set_adapter(name)
        alone = model(input_ids=batch["input_ids"][i : i + 1]).logits
        assert torch.allclose(out[i : i + 1], alone, atol=1e-5)
