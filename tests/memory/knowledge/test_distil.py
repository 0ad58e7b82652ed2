"""The distillation signal: texts about an item (reordered sentences, the teacher's rewrites),
the teacher's view of them, and the general-text anchor that holds the rest of the model."""

from __future__ import annotations

import pytest
import torch

from herllm.config import LoraConfig, ModelConfig
from herllm.memory.knowledge import KnowledgeStore, Scope
from herllm.memory.knowledge.consolidate import consolidate, retention_nll, stable_items
from herllm.memory.knowledge.distil import (
    anchor_samples,
    encode,
    render,
    rewrites,
    shuffled,
    student_kl,
    teacher_samples,
    text_samples,
)
from herllm.models.load import attach_lora, load_base

FACT = (
    "Zorvath Keep was founded by the weaver Ilsa Marrow in 1742. The keep guards the Quillan "
    "Pass. Its bell, named Old Tamsin, rings at every full moon. The keepers brew a blue tea "
    "called marrowleaf."
)


@pytest.fixture()
def tiny():
    torch.manual_seed(0)
    base, tok = load_base(ModelConfig(name_or_path="herllm-tiny"))
    return attach_lora(base, LoraConfig(r=8, alpha=16)), tok


def windows(tok, n: int, width: int = 48, skip: int = 0) -> list[list[int]]:
    """Windows of the bundled general text (train split)."""
    from herllm.acquire.corpus import load_documents

    ids = tok(" ".join(load_documents("general", "train")[:20]), add_special_tokens=False)
    ids = ids["input_ids"]
    return [ids[(skip + i) * width : (skip + i + 1) * width] for i in range(n)]


def test_shuffles_reorder_the_same_sentences_and_are_seeded():
    got = shuffled(FACT, 3, seed=5)
    assert len(got) == 3 and got == shuffled(FACT, 3, seed=5)

    def sentences(text):
        return sorted(s.rstrip(".") for s in text.split(". "))

    for text in got:  # the same four sentences, nothing added or lost
        assert sentences(text) == sentences(" ".join(FACT.split()))
    assert len(set(got)) > 1  # 4 sentences: 24 orders, 3 draws are not all the same
    assert shuffled("One sentence only.", 3, seed=0) == []


def test_text_samples_carry_the_teacher_with_the_passage_at_every_token(tiny):
    model, tok = tiny
    text = "The keepers of Zorvath Keep brew a blue tea."
    [s] = text_samples(model, tok, FACT, [text], topk=8)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    head = encode(tok, render(tok, ""))
    assert s.student_ids == head + ids and s.gen_start == len(head)
    assert s.top_idx.shape == (len(ids), 8)
    teacher = encode(tok, render(tok, "", [FACT])) + ids
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([teacher])).logits[0, -len(ids) - 1 : -1]
    assert torch.equal(s.top_idx, logits.topk(8, dim=-1).indices)
    want = logits.log_softmax(-1).topk(8, dim=-1).values  # the teacher's own log-probs
    assert torch.allclose(s.top_logp, want, atol=1e-5)
    # the student (no passage) differs from the teacher, so the KL is positive
    assert student_kl(model, [s], tok.pad_token_id) > 0.0


def test_rewrites_are_seeded_and_every_text_kind_is_a_sample(tiny):
    model, tok = tiny
    a = rewrites(model, tok, FACT, 3, new_tokens=24, seed=1)
    assert a == rewrites(model, tok, FACT, 3, new_tokens=24, seed=1) and 1 <= len(a) <= 3
    got = teacher_samples(model, tok, FACT, prompts=2, new_tokens=8, whole=True, shuffles=2,
                          rewrites_n=3, rewrite_tokens=24, topk=8, seed=1)  # fmt: skip
    assert len(got) == 2 + 1 + 2 + len(a)


def test_anchor_samples_are_the_model_itself(tiny):
    model, tok = tiny
    anchor = anchor_samples(model, windows(tok, 3), topk=16)
    assert [len(s.student_ids) for s in anchor] == [48, 48, 48]
    # the KL (top-16 and the rest) at the model that made them is zero
    assert student_kl(model, anchor, tok.pad_token_id) == pytest.approx(0.0, abs=1e-4)


def test_the_anchor_holds_its_windows_while_the_fact_is_learned(tiny, tmp_path):
    """The same consolidation with and without general windows trained toward the model as it
    was: both learn the fact, the anchored one keeps the model's distributions on those windows
    closer to where they were, and it is charged for the anchor's tokens. (How far that carries
    to held-out general text is measured on SmolLM2, docs/benchmarks.md: on herllm-tiny held-out
    text did not move less.)"""
    model, tok = tiny
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    x = torch.tensor(windows(tok, 8, skip=40))  # held out: after the anchor's windows
    general = [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()}]
    ref = anchor_samples(model, windows(tok, 32))  # the model as it was, on the anchor's windows
    out, moved = {}, {}
    for name, anchor in (("plain", ()), ("anchored", windows(tok, 32))):
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in start:
                    p.copy_(start[n])
        store = KnowledgeStore(tmp_path / f"{name}.sqlite")
        store.add(FACT, scope=Scope("run", "t"))
        items = stable_items(store, Scope("run", "t"), min_retrievals=0)
        torch.manual_seed(0)
        res = consolidate(model, tok, store, items, run_dir=tmp_path / name, passes=6, lr=5e-3,
                          prompts=2, whole=True, shuffles=2, rewrites=0, anchor=anchor,
                          anchor_share=1.0, retention={"general": general}, tolerance=100.0)  # fmt: skip
        store.close()
        out[name], moved[name] = res, student_kl(model, ref, tok.pad_token_id)
        assert res.kl_after < 0.6 * res.kl_before
    assert moved["plain"] > 0.005 and moved["anchored"] < 0.8 * moved["plain"], moved
    assert out["anchored"].tokens_trained > out["plain"].tokens_trained  # the anchor is charged
    assert retention_nll(model, general) == pytest.approx(
        out["anchored"].retention_after["general"], rel=1e-5
    )
