"""Chat templates: rendering, and loss masks that train the assistant's tokens only."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from herllm.errors import UserError
from herllm.models import chat
from herllm.models.chat import (
    apply_chat,
    chat_training_example,
    encode_chat,
    messages_from_record,
)
from herllm.models.load import BUNDLED

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHATML_GENERATION = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|im_end|>"
    "{% endgeneration %}{% else %}{{ m['content'] }}<|im_end|>{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
REWRITES_LAST = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if loop.last %}{{ m['content'] | upper }}{% else %}{{ m['content'] }}{% endif %}"
    "<|im_end|>\n{% endfor %}"
)
CONVERSATION = [
    {"role": "system", "content": "The keeper writes the day into the ledger."},
    {"role": "user", "content": "What does the river carry?"},
    {"role": "assistant", "content": "What the mountain gives it."},
    {"role": "user", "content": "And the valley?"},
    {"role": "assistant", "content": "The valley listens."},
]


def tokenizer(model_dir, template: str | None):
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    tok.chat_template = template
    return tok


@pytest.fixture()
def chatml(tiny_model_dir):
    return tokenizer(tiny_model_dir, CHATML)


def trained_text(tok, ids, mask) -> str:
    return tok.decode([i for i, m in zip(ids, mask, strict=True) if m])


def test_only_assistant_turns_and_their_end_token_are_trained(chatml):
    ids, mask = chat_training_example(chatml, {"messages": CONVERSATION})
    assert len(ids) == len(mask) and set(mask) == {0, 1}
    assert trained_text(chatml, ids, mask) == (
        "What the mountain gives it.<|im_end|>The valley listens.<|im_end|>"
    )
    masked = chatml.decode([i for i, m in zip(ids, mask, strict=True) if not m])
    assert "ledger" in masked and "river" in masked and "mountain" not in masked
    assert (
        ids
        == chatml(apply_chat(chatml, CONVERSATION, False), add_special_tokens=False)["input_ids"]
    )  # the ids are the whole conversation's, as at inference


def test_prompt_response_records_become_a_user_and_an_assistant_turn(chatml):
    ids, mask = chat_training_example(
        chatml, {"prompt": "Rain falls", "response": "the river rises"}
    )
    assert trained_text(chatml, ids, mask) == "the river rises<|im_end|>"
    assert chatml.decode(ids).startswith("<|im_start|>user\nRain falls<|im_end|>")


def test_generation_blocks_give_the_same_mask(tiny_model_dir, chatml, monkeypatch):
    expected = chat_training_example(chatml, CONVERSATION)
    tok = tokenizer(tiny_model_dir, CHATML_GENERATION)
    monkeypatch.setattr(chat, "assistant_spans", None)  # the template's own blocks are used
    assert chat_training_example(tok, CONVERSATION) == expected


def test_a_template_that_rewrites_earlier_turns_is_refused(tiny_model_dir):
    tok = tokenizer(tiny_model_dir, REWRITES_LAST)
    with pytest.raises(UserError, match="chats.jsonl:3: the chat template renders the start"):
        chat_training_example(tok, CONVERSATION, where="chats.jsonl:3")


def test_apply_chat_adds_the_generation_prompt(chatml):
    text = apply_chat(chatml, CONVERSATION[:2], add_generation_prompt=True)
    assert text.endswith("What does the river carry?<|im_end|>\n<|im_start|>assistant\n")
    assert (
        encode_chat(chatml, CONVERSATION[:2]) == chatml(text, add_special_tokens=False)["input_ids"]
    )


@pytest.mark.parametrize(
    "record, match",
    [
        ({"messages": []}, "chats.jsonl:7: 'messages' must be a non-empty list"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "message 0 has role 'tool'; use one"),
        ({"messages": [{"role": "user", "content": " "}]}, r"message 0 \(user\) has no text"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant message"),
        ({"messages": CONVERSATION[2:3]}, "starts with an assistant message"),
        ({"text": "plain"}, "not a conversation; give a 'messages' list"),
        ({"prompt": "p", "response": 3}, r"message 1 \(assistant\) has no text"),
    ],
)
def test_bad_conversations_get_one_line_naming_the_record(chatml, record, match):
    with pytest.raises(UserError, match=match) as err:
        chat_training_example(chatml, record, where="chats.jsonl:7")
    assert str(err.value).startswith("chats.jsonl:7: ") and "\n" not in str(err.value)


def test_a_template_error_is_one_line(tiny_model_dir):
    tok = tokenizer(tiny_model_dir, "{{ raise_exception('roles must alternate') }}")
    with pytest.raises(UserError, match="x.jsonl:1: the chat template refused it: roles must"):
        chat_training_example(tok, CONVERSATION, where="x.jsonl:1")


def test_no_template_says_which_model_and_what_to_use():
    tok = AutoTokenizer.from_pretrained(BUNDLED["herllm-tiny"])
    for call in (lambda: apply_chat(tok, CONVERSATION), lambda: chat_training_example(tok, [])):
        with pytest.raises(UserError) as err:
            call()
        msg = str(err.value)
        assert msg.startswith("model herllm-tiny has no chat template") and "\n" not in msg
        assert "--model smollm2-135m" in msg


def test_messages_are_copied_as_role_and_content():
    msgs = messages_from_record([{"role": "user", "content": "a", "name": "x"}])
    assert msgs == [{"role": "user", "content": "a"}]
