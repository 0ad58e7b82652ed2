"""Consolidation (prompt distillation into the adapter): it moves the student toward the teacher,
an accepted one rolls back bit-exactly, and the gate rejects one that hurts general text."""

from __future__ import annotations

import json

import pytest
import torch

from herllm.config import LoraConfig, ModelConfig
from herllm.memory.knowledge import KnowledgeStore, Scope
from herllm.memory.knowledge.consolidate import (
    adapter_state,
    consolidate,
    earlier_samples,
    live_consolidations,
    load_adapter_state,
    rollback_consolidation,
    stable_items,
)
from herllm.memory.knowledge.distil import load_samples, passage_prompts, render, topk_kl
from herllm.memory.knowledge.forget import forget_from_weights
from herllm.models.load import attach_lora, load_base

FACT = (
    "Zorvath Keep was founded by the weaver Ilsa Marrow in 1742. The keep guards the Quillan "
    "Pass. Its bell, named Old Tamsin, rings at every full moon. The keepers brew a blue tea "
    "called marrowleaf."
)
GENERAL = "The cat sat on the mat. The sun rose over the hills and the farmers went to the fields."


@pytest.fixture()
def tiny():
    torch.manual_seed(0)
    base, tok = load_base(ModelConfig(name_or_path="herllm-tiny"))
    return attach_lora(base, LoraConfig(r=8, alpha=16)), tok


@pytest.fixture()
def store(tmp_path):
    s = KnowledgeStore(tmp_path / "k.sqlite")
    s.add(FACT, scope=Scope("run", "t"), doc_id="zorvath")
    yield s
    s.close()


def general_batches(tok):
    ids = tok(GENERAL * 3, return_tensors="pt")["input_ids"][:, :64]
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}]


def test_topk_kl_is_zero_at_the_teacher_and_positive_elsewhere():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    top, idx = logits.log_softmax(-1).topk(4)
    assert float(topk_kl(top, idx, logits)) == pytest.approx(0.0, abs=1e-6)
    assert float(topk_kl(top, idx, torch.zeros(1, 4))) > 0.1
    # top-2 of 4: zero at the teacher still, and positive for a student that moves the rest's
    # mass onto the top-2 (a renormalised top-k KL would score that student 0)
    top2, idx2 = logits.log_softmax(-1).topk(2)
    assert float(topk_kl(top2, idx2, logits)) == pytest.approx(0.0, abs=1e-6)
    sure = torch.tensor([[2.0, 1.0, -30.0, -30.0]])
    assert float(topk_kl(top2, idx2, sure)) > 0.05
    exact = sum(
        p * (p / q).log()
        for p, q in zip(logits.softmax(-1)[0], sure.softmax(-1)[0], strict=True)
        if p > 0
    )  # the KL of the full rows, for comparison: the bucket only merges
    assert float(topk_kl(top2, idx2, sure)) <= float(exact) + 1e-6


def test_render_puts_the_passage_only_in_the_teacher_input(tiny):
    _, tok = tiny
    assert render(tok, "Zorvath Keep was", ["a fact"]).endswith("- a fact\n\nZorvath Keep was")
    assert render(tok, "Zorvath Keep was") == "Zorvath Keep was"
    assert passage_prompts(FACT, 2) == ["Zorvath Keep was founded", "Its bell, named Old"]


def test_consolidation_moves_toward_the_teacher_and_rolls_back_bit_exactly(tiny, store, tmp_path):
    model, tok = tiny
    items = stable_items(store, Scope("run", "t"), min_retrievals=0)
    before = adapter_state(model)
    res = consolidate(model, tok, store, items, run_dir=tmp_path, passes=8, lr=3e-3,
                      retention={"general": general_batches(tok)}, tolerance=10.0)  # fmt: skip
    assert res.accepted and res.entry == "cons-0001"
    assert res.kl_after < 0.5 * res.kl_before, (res.kl_before, res.kl_after)
    assert store.get(items[0].id).consolidated_into == "cons-0001"
    assert stable_items(store, Scope("run", "t"), min_retrievals=0) == []
    record = json.loads((tmp_path / "ledger.jsonl").read_text().splitlines()[0])
    assert record["type"] == "consolidation" and record["items"] == [items[0].id]
    changed = adapter_state(model)
    assert any(not torch.equal(changed[k], before[k]) for k in before)
    assert rollback_consolidation(model, tmp_path, "cons-0001", store) == [items[0].id]
    after = adapter_state(model)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert store.get(items[0].id).consolidated_into is None


def test_gate_rejects_a_consolidation_that_hurts_general_text(tiny, store, tmp_path):
    model, tok = tiny
    items = stable_items(store, Scope("run", "t"), min_retrievals=0)
    before = adapter_state(model)
    # a learning rate of 1 wrecks the adapter: general text's NLL jumps far past 2%
    res = consolidate(model, tok, store, items, run_dir=tmp_path, passes=4, lr=1.0,
                      retention={"general": general_batches(tok)}, tolerance=0.02)  # fmt: skip
    assert not res.accepted and res.entry is None and "general NLL" in res.reason
    assert res.retention_after["general"] > 1.02 * res.retention_before["general"]
    after = adapter_state(model)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert not (tmp_path / "ledger.jsonl").exists()
    assert store.get(items[0].id).consolidated_into is None


OTHER = (
    "The river Vell runs north from Lake Orrin to the Grey Sea. Ferrymen on the Vell wear "
    "green caps, and the largest ferry is called the Patient Heron."
)
KW = dict(passes=2, lr=3e-3, tolerance=10.0)


def test_rolling_back_an_entry_unmarks_the_later_ones_whose_weights_go_too(tiny, store, tmp_path):
    model, tok = tiny
    first = stable_items(store, Scope("run", "t"), min_retrievals=0)
    second = [store.add(OTHER, scope=Scope("run", "t"), doc_id="vell")]
    consolidate(model, tok, store, first, run_dir=tmp_path, **KW)
    consolidate(model, tok, store, second, run_dir=tmp_path, **KW)
    assert [r["entry"] for r in live_consolidations(tmp_path)] == ["cons-0001", "cons-0002"]
    undone = rollback_consolidation(model, tmp_path, "cons-0001", store)
    assert undone == [first[0].id, second[0].id]  # the weights went back past cons-0002 too
    assert live_consolidations(tmp_path) == []
    assert store.get(second[0].id).consolidated_into is None


def test_forgetting_a_consolidated_item_takes_it_out_of_the_weights(tiny, store, tmp_path):
    """Forgetting one of two consolidated items leaves exactly the adapter that consolidating
    the other alone would have made (bit-exact), and a later entry's item stays untouched."""
    model, tok = tiny
    start = adapter_state(model)
    fact = stable_items(store, Scope("run", "t"), min_retrievals=0)[0]
    other = store.add(OTHER, scope=Scope("run", "t"), doc_id="vell")
    ret = {"general": general_batches(tok)}
    torch.manual_seed(1)
    consolidate(model, tok, store, [fact, other], run_dir=tmp_path / "a", retention=ret, **KW)
    ids = store.forget(fact.id)
    torch.manual_seed(2)
    out = forget_from_weights(model, tok, store, ids, run_dir=tmp_path / "a", retention=ret, **KW)
    assert out.rolled_back == ["cons-0001"] and [r.entry for r in out.redone] == ["cons-0002"]
    assert (
        out.redone[0].items == [other.id] and store.get(other.id).consolidated_into == "cons-0002"
    )
    got = adapter_state(model)
    load_adapter_state(model, start)
    torch.manual_seed(2)
    consolidate(
        model, tok, None, [store.get(other.id)], run_dir=tmp_path / "b", retention=ret, **KW
    )
    want = adapter_state(model)
    assert all(torch.equal(got[k], want[k]) for k in want)
    # forgetting an item no consolidation holds changes nothing
    loose = store.add("Nothing here was consolidated.", scope=Scope("run", "t"))
    assert not forget_from_weights(
        model, tok, store, store.forget(loose.id), run_dir=tmp_path / "a"
    ).changed
    assert all(torch.equal(adapter_state(model)[k], want[k]) for k in want)


def test_earlier_consolidations_are_kept_replayed_and_guarded(tiny, store, tmp_path):
    """An accepted consolidation keeps some of its samples (teacher top-k included, exactly);
    the next one trains on a share of them beside its own and measures them; a consolidation
    that makes the model lose what earlier ones hold is rejected and leaves the weights as they
    were."""
    model, tok = tiny
    first = consolidate(model, tok, store, stable_items(store, Scope("run", "t"), min_retrievals=0),
                        run_dir=tmp_path, **KW)  # fmt: skip
    kept, meta = load_samples(tmp_path / "consolidations" / "cons-0001" / "samples.safetensors")
    assert kept[0].student_ids == first.samples[0].student_ids
    assert torch.equal(kept[0].top_logp, first.samples[0].top_logp)
    assert torch.equal(kept[0].top_idx, first.samples[0].top_idx)
    check, unlearned, replay = earlier_samples(tmp_path)
    assert len(check) + len(replay) == len(kept) and check and replay
    assert unlearned == float(meta["check_kl"]) > 0
    other = [store.add(OTHER, scope=Scope("run", "t"), doc_id="vell")]
    second = consolidate(model, tok, store, other, run_dir=tmp_path, replay_share=0.3, **KW)
    own = sum(len(s.student_ids) for s in second.samples)
    replayed = second.tokens_trained // KW["passes"] - own  # no anchor: the rest is replay
    longest = max(len(s.student_ids) for s in replay)
    assert 0.3 * own <= replayed < 0.3 * own + longest, (own, replayed)
    assert second.accepted and "earlier_kl" in second.retention_after
    # two consolidations live now: both are checked, and a wrecking one is refused for them
    assert len(earlier_samples(tmp_path)[0]) > len(check)
    before = adapter_state(model)
    third = [store.add(GENERAL, scope=Scope("run", "t"), doc_id="cat")]
    res = consolidate(model, tok, store, third, run_dir=tmp_path, passes=2, lr=1.0,
                      earlier_keep=1.0, replay_share=0.0)  # fmt: skip
    assert not res.accepted and "earlier consolidations" in res.reason
    assert res.retention_after["earlier_kl"] > res.retention_before["earlier_kl"]
    assert all(torch.equal(adapter_state(model)[k], before[k]) for k in before)
    assert [r["entry"] for r in live_consolidations(tmp_path)] == ["cons-0001", "cons-0002"]
