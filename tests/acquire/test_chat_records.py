"""Chat records in the stream: `{"messages": [...]}` JSONL, trained through the chat template
with the loss on the assistant turns only; text and plain records keep their tokenization."""

from __future__ import annotations

import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from herllm.acquire.chunks import Packer, tokenize_document
from herllm.acquire.sources import BadInputError, Document, SourceStats, read_documents
from herllm.errors import UserError

CONVERSATION = [
    {"role": "system", "content": "The keeper writes the day into the ledger."},
    {"role": "user", "content": "What does the river carry?"},
    {"role": "assistant", "content": "What the mountain gives it."},
    {"role": "user", "content": "And the valley?"},
    {"role": "assistant", "content": "The valley listens."},
]


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def trained(tok, ids, mask) -> str:
    return tok.decode([i for i, m in zip(ids, mask, strict=True) if m])


def test_a_messages_line_becomes_a_document_that_carries_the_conversation(tmp_path):
    src = write_jsonl(tmp_path / "c.jsonl", [{"messages": CONVERSATION}, {"text": "plain"}])
    chat, plain = list(read_documents([src]))
    assert chat.doc_id == f"{src}:1" and chat.conversation() == CONVERSATION
    assert "What the mountain gives it." in chat.text and chat.response is None
    assert plain.messages is None and plain.conversation() is None


@pytest.mark.parametrize(
    ("messages", "says"),
    [
        ([{"role": "bot", "content": "hi"}], "message 0 has role 'bot'"),
        ([{"role": "user", "content": "  "}], "message 0 (user) has no text"),
        ([{"role": "user", "content": "only a question"}], "no assistant message"),
        ("not a list", "'messages' must be a non-empty list"),
    ],
)
def test_bad_conversations_are_one_line_naming_file_and_line(tmp_path, messages, says):
    src = write_jsonl(tmp_path / "c.jsonl", [{"text": "fine"}, {"messages": messages}])
    with pytest.raises(BadInputError) as err:
        list(read_documents([src]))
    assert str(err.value).startswith(f"{src}:2: ") and says in str(err.value)
    assert "\n" not in str(err.value) and "--on-bad-input skip" in str(err.value)
    stats = SourceStats()
    assert [d.doc_id for d in read_documents([src], on_bad_input="skip", stats=stats)] == [
        f"{src}:1"
    ]
    assert stats.skipped_count == 1


def test_messages_train_only_the_assistant_turns(chatml_tokenizer):
    doc = Document("c.jsonl:1", "", messages=tuple((m["role"], m["content"]) for m in CONVERSATION))
    ids, mask = tokenize_document(doc, chatml_tokenizer)
    assert trained(chatml_tokenizer, ids, mask) == (
        "What the mountain gives it.<|im_end|>The valley listens.<|im_end|>"
    )
    assert chatml_tokenizer.decode(ids).startswith("<|im_start|>system\nThe keeper")


def test_prompt_response_uses_the_template_by_choice(chatml_tokenizer):
    doc = Document("p.jsonl:1", "Rain falls", "the river rises")
    ids, mask = tokenize_document(doc, chatml_tokenizer)  # auto: the tokenizer has one
    assert trained(chatml_tokenizer, ids, mask) == "the river rises<|im_end|>"
    assert "<|im_start|>user" in chatml_tokenizer.decode(ids)
    plain_ids, plain_mask = tokenize_document(doc, chatml_tokenizer, "never")
    assert "<|im_start|>" not in chatml_tokenizer.decode(plain_ids)
    assert trained(chatml_tokenizer, plain_ids, plain_mask) == "the river rises</s>"


def test_without_a_template_records_tokenize_as_before(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)  # herllm-tiny-like: no chat template
    body = tok("Rain falls", add_special_tokens=False)["input_ids"]
    resp = tok(" the river rises", add_special_tokens=False)["input_ids"]
    expected = [tok.bos_token_id, *body, *resp, tok.eos_token_id]
    for mode in ("auto", "never"):
        ids, mask = tokenize_document(Document("p:1", "Rain falls", " the river rises"), tok, mode)
        assert ids == expected
        assert mask == [False] * (1 + len(body)) + [True] * (len(resp) + 1)
        text_ids, text_mask = tokenize_document(Document("t#0", "Rain falls"), tok, mode)
        assert text_ids == [tok.bos_token_id, *body, tok.eos_token_id] and all(text_mask[1:])


def test_a_model_without_a_template_refuses_chat_records_in_one_line(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    doc = Document("c.jsonl:3", "", messages=(("user", "hi"), ("assistant", "hello")))
    with pytest.raises(UserError, match=r"^c\.jsonl:3 is a chat 'messages' record.*smollm2-135m"):
        tokenize_document(doc, tok)
    with pytest.raises(UserError, match="stream.chat_template=never"):
        tokenize_document(doc, tok, "never")
    with pytest.raises(UserError, match=r"^p:1 is a chat record, but .* no chat template"):
        tokenize_document(Document("p:1", "Rain falls", "the river rises"), tok, "always")


def test_a_packed_window_of_chat_records_masks_all_but_the_assistant(chatml_tokenizer, tmp_path):
    src = write_jsonl(tmp_path / "c.jsonl", [{"messages": CONVERSATION}, {"text": "Rain falls."}])
    windows = list(Packer(chatml_tokenizer, 512).windows(read_documents([src])))
    assert len(windows) == 1
    w = windows[0]
    ids, mask = w.input_ids[: w.n_tokens], w.loss_mask[: w.n_tokens]
    text_ids = tokenize_document(Document("t", "Rain falls."), chatml_tokenizer)[0]
    chat_len = w.n_tokens - len(text_ids)
    assert trained(chatml_tokenizer, ids[:chat_len], mask[:chat_len]) == (
        "What the mountain gives it.<|im_end|>The valley listens.<|im_end|>"
    )
    assert mask[chat_len + 1 :].all() and not mask[chat_len]  # the text document: all but BOS
    assert not np.any(w.loss_mask[w.n_tokens :])
