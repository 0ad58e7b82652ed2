"""Likelihood scoring of multiple-choice probes (herllm.evaluate.probes)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from herllm.evaluate.probes import _encode, choice_logprobs, probe_accuracy
from herllm.models.tokenizer import train_tokenizer

FACTS = [
    "the capital of france is paris",
    "the capital of italy is rome",
    "the capital of spain is madrid",
    "the capital of germany is berlin",
    "the colour of grass is green",
    "the colour of the sky is blue",
    "the colour of snow is white",
    "the colour of coal is black",
]


@dataclass(frozen=True)
class Item:
    prompt: str
    choices: tuple[str, ...]
    answer: int
    kind: str = "fact"
    split: str = "seen"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = FACTS * 20 + ["a b c d e f g h i j k l m n o p q r s t u v w x y z"]
    return train_tokenizer(texts, tmp_path_factory.mktemp("tok"), vocab_size=300, min_frequency=1)


def tiny_model(vocab: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)  # fmt: skip
    return LlamaForCausalLM(cfg)


class Uniform(torch.nn.Module):
    """Every next token equally likely: sum log-prob prefers the fewest tokens, mean ties."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None):
        logits = torch.zeros(*input_ids.shape, self.vocab)  # (B, T, V)
        return type("Out", (), {"logits": logits})


def test_choice_tokens_are_exactly_the_choice(tok):
    item = Item("the capital of france is", ("paris", "rome", "madrid", "berlin"), 0)
    for (ids, start), choice in zip(_encode(tok, item), item.choices, strict=True):
        assert tok.decode(ids[start:]) == " " + choice
        assert ids[:start] == tok(item.prompt)["input_ids"]


def test_sum_prefers_short_choices_mean_does_not(tok):
    item = Item("the colour of snow is", ("white", "black green blue white", "green", "blue"), 1)
    res = probe_accuracy(Uniform(len(tok)), tok, [item])
    assert res["acc_sum"] == 0.0  # the long answer loses on total log-prob
    scores = choice_logprobs(Uniform(len(tok)), tok, [item])[0]
    lp_per_token = [s / n for s, n in scores]
    assert max(lp_per_token) - min(lp_per_token) < 1e-5  # uniform: all equal per token


@pytest.mark.slow
def test_overfit_model_answers_known_facts(tok):
    model = tiny_model(len(tok))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = tok(FACTS, padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    for _ in range(150):
        loss = model(**batch, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    caps = ("paris", "rome", "madrid", "berlin")
    cols = ("green", "blue", "white", "black")
    items = [Item(f.rsplit(" ", 1)[0], caps if i < 4 else cols, i % 4) for i, f in enumerate(FACTS)]
    res = probe_accuracy(model, tok, items, batch_size=5)  # batch 5: padding across items
    assert res["acc_mean"] == 1.0 and res["acc_sum"] == 1.0
    assert res["groups"]["fact/seen"]["n"] == 8
    untrained = probe_accuracy(tiny_model(len(tok)), tok, items)
    assert untrained["acc_mean"] < 1.0


def test_rejects_bad_input(tok):
    with pytest.raises(ValueError, match="no items"):
        probe_accuracy(Uniform(len(tok)), tok, [])
    with pytest.raises(ValueError, match="outside its 4 choices"):
        probe_accuracy(Uniform(len(tok)), tok, [Item("x", ("a", "b", "c", "d"), 4)])
