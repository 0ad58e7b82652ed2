"""Prompt building: a system message with a chat template, a plain preamble without, a budget."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from herllm.errors import UserError
from herllm.memory.knowledge import Hit, Item, Scope, build_prompt
from herllm.memory.knowledge.retrieval import bundled_tiny_dir

TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _hit(text: str, score: float) -> Hit:
    item = Item(
        id=text[:8], text=text, scope=Scope("user", "alice"), doc_id=None, offsets=None,
        source="api", created="2026-01-01T00:00:00+00:00", version=1, status="active",
        supersedes=None, root_id=text[:8], retrieval_count=0, consolidated_into=None,
    )  # fmt: skip
    return Hit(item, score, score)


HITS = [
    _hit("Malm Town has a wind farm.", 0.5),
    _hit("Karl Gustav is the mayor of Malm Town.", 0.9),
    _hit("The summit is held every year.", 0.2),
]


@pytest.fixture(scope="module")
def plain_tok():
    tok = AutoTokenizer.from_pretrained(bundled_tiny_dir())
    assert not getattr(tok, "chat_template", None)
    return tok


@pytest.fixture(scope="module")
def chat_tok():
    tok = AutoTokenizer.from_pretrained(bundled_tiny_dir())
    tok.chat_template = TEMPLATE
    return tok


def test_plain_preamble_best_first(plain_tok):
    out = build_prompt(HITS, "Who is the mayor?", plain_tok)
    assert out.text == (
        "Known facts:\n- Karl Gustav is the mayor of Malm Town.\n- Malm Town has a wind farm.\n"
        "- The summit is held every year.\n\nWho is the mayor?"
    )
    assert out.messages is None and out.dropped == []
    assert out.n_tokens == len(plain_tok.encode(out.text))


def test_chat_template_puts_facts_in_the_system_message(chat_tok):
    out = build_prompt(HITS[:1], "Who is the mayor?", chat_tok)
    assert out.messages == [
        {"role": "system", "content": "Known facts:\n- Malm Town has a wind farm."},
        {"role": "user", "content": "Who is the mayor?"},
    ]
    assert out.text == (
        "<|system|>Known facts:\n- Malm Town has a wind farm.\n<|user|>Who is the mayor?\n"
        "<|assistant|>"
    )


def test_existing_system_message_is_merged_not_duplicated(chat_tok):
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Who is the mayor?"},
    ]
    out = build_prompt(HITS[1:2], messages, chat_tok)
    assert [m["role"] for m in out.messages] == ["system", "user"]
    assert out.messages[0]["content"] == (
        "Answer briefly.\n\nKnown facts:\n- Karl Gustav is the mayor of Malm Town."
    )
    assert messages[0]["content"] == "Answer briefly."  # the caller's list is untouched


def test_messages_without_template_become_a_transcript(plain_tok):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    out = build_prompt(HITS[2:], messages, plain_tok)
    assert out.text == (
        "Known facts:\n- The summit is held every year.\n\nuser: Hi\nassistant: Hello\nassistant:"
    )


@pytest.mark.parametrize("which", ["plain", "chat"])
def test_budget_drops_the_lowest_scored_hits(which, plain_tok, chat_tok):
    tok = plain_tok if which == "plain" else chat_tok
    full = build_prompt(HITS, "Who is the mayor?", tok)
    two = build_prompt(HITS[:2], "Who is the mayor?", tok)
    out = build_prompt(HITS, "Who is the mayor?", tok, budget=full.n_tokens - 1)
    assert [h.score for h in out.used] == [0.9, 0.5] and [h.score for h in out.dropped] == [0.2]
    assert out.text == two.text and out.n_tokens <= full.n_tokens - 1
    bare = build_prompt([], "Who is the mayor?", tok)
    none = build_prompt(HITS, "Who is the mayor?", tok, budget=bare.n_tokens)
    assert none.used == [] and none.text == bare.text


def test_forgotten_hits_and_bad_messages(plain_tok):
    gone = Hit(Item(**{**HITS[0].item.__dict__, "text": None, "status": "forgotten"}), 1.0, 1.0)
    assert build_prompt([gone], "Q?", plain_tok).text == "Q?"
    with pytest.raises(UserError, match="chat message 0"):
        build_prompt([], [{"content": "no role"}], plain_tok)
    with pytest.raises(UserError, match="positive number of tokens"):
        build_prompt([], "Q?", plain_tok, budget=0)
