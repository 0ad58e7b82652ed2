"""Chat templates: render conversations, and train on the assistant's turns only.

A conversation is a list of `{"role": "system" | "user" | "assistant", "content": str}`
messages (the OpenAI chat format). Records are `{"messages": [...]}` or, as in herllm's JSONL
streams, `{"prompt": ..., "response": ...}` (a user turn and an assistant turn).

`chat_training_example` renders the whole conversation through the tokenizer's chat template
and marks which tokens are trained: the assistant turns' tokens, their end-of-turn token
included; system and user turns and the template's markup are masked out. Templates with
`{% generation %}` blocks say that themselves (`return_assistant_tokens_mask`); for the others
(SmolLM2's among them) each assistant turn's characters are found by rendering the prefix before
it (with the generation prompt) and the prefix that ends with it, and tokens are mapped to
characters through the tokenizer's offsets, so tokenization across a boundary cannot shift them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

from jinja2 import TemplateError

from herllm.errors import UserError

ROLES = ("system", "user", "assistant")
GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")
# A template's raise_exception() raises TemplateError; bad data inside it, the others.
TEMPLATE_ERRORS = (TemplateError, ValueError, TypeError, KeyError)


class ChatExample(NamedTuple):
    """One conversation ready for training (unpacks as `input_ids, loss_mask`)."""

    input_ids: list[int]
    """The rendered conversation's tokens (the template's own special tokens included)."""
    loss_mask: list[int]
    """1 where the token is the assistant's (trained), 0 elsewhere; as long as `input_ids`."""


def messages_from_record(record: object, where: str = "record") -> list[dict[str, str]]:
    """The checked conversation of a `{"messages": [...]}` or `{"prompt", "response"}` record."""
    if isinstance(record, list):
        return check_messages(record, where)
    if isinstance(record, dict) and "messages" in record:
        return check_messages(record["messages"], where)
    if isinstance(record, dict) and "prompt" in record and "response" in record:
        messages = [
            {"role": "user", "content": record["prompt"]},
            {"role": "assistant", "content": record["response"]},
        ]
        return check_messages(messages, where)
    raise UserError(
        f"{where}: not a conversation; give a 'messages' list (roles system/user/assistant) "
        "or string 'prompt' and 'response' fields"
    )


def check_messages(messages: object, where: str = "messages") -> list[dict[str, str]]:
    """`messages` as plain role/content dicts, or one line saying what is wrong with them."""
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: 'messages' must be a non-empty list of role/content objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            role = m.get("role") if isinstance(m, dict) else type(m).__name__
            raise UserError(
                f"{where}: message {i} has role {role!r}; use one of {', '.join(ROLES)}"
            )
        if not isinstance(m.get("content"), str) or not m["content"].strip():
            raise UserError(
                f"{where}: message {i} ({m['role']}) has no text; give it a non-empty "
                "string 'content'"
            )
        out.append({"role": m["role"], "content": m["content"]})
    return out


def check_trainable(messages: list[dict], where: str = "conversation") -> list[dict]:
    """`messages` (already checked) if they can be trained on: an assistant reply to learn,
    after at least one system or user message."""
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError(f"{where}: no assistant message, so nothing to learn; add the reply")
    if messages[0]["role"] == "assistant":
        raise UserError(
            f"{where}: the conversation starts with an assistant message; start it with a "
            "user (or system) message"
        )
    return messages


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def require_chat_template(tokenizer) -> None:
    """One line when the tokenizer cannot render conversations (herllm-tiny has no template)."""
    if not has_chat_template(tokenizer):
        name = Path(str(getattr(tokenizer, "name_or_path", "") or "this model")).name
        raise UserError(
            f"model {name} has no chat template, so it cannot take chat messages; use "
            "--model smollm2-135m or another model whose tokenizer has a chat template"
        )


def apply_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The conversation rendered by the tokenizer's chat template, as text.

    Tokenize the text with `add_special_tokens=False` (the template already wrote them), or
    call `encode_chat`.
    """
    require_chat_template(tokenizer)
    return _render(tokenizer, check_messages(messages), add_generation_prompt, "messages")


def encode_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """The token ids of `apply_chat` (no second BOS)."""
    text = apply_chat(tokenizer, messages, add_generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def chat_training_example(tokenizer, record: object, where: str = "conversation") -> ChatExample:
    """`(input_ids, loss_mask)` of a conversation: only the assistant's tokens are trained.

    `record` is a list of messages, a `{"messages": [...]}` record or a prompt/response record;
    `where` names it in errors (e.g. `chats.jsonl:12`).
    """
    require_chat_template(tokenizer)
    messages = check_trainable(messages_from_record(record, where), where)
    if GENERATION_BLOCK.search(_template_text(tokenizer)):
        return _from_generation_blocks(tokenizer, messages, where)
    text, spans = assistant_spans(tokenizer, messages, where)
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:
        raise UserError(
            f"{where}: this tokenizer gives no character offsets (a slow tokenizer); use a "
            "model with a fast (tokenizers) tokenizer for chat training"
        ) from None
    # A token is the assistant's when it starts inside an assistant span.
    mask = [int(any(a <= s < b for a, b in spans)) for s, _e in enc["offset_mapping"]]
    return ChatExample(list(enc["input_ids"]), mask)


def assistant_spans(
    tokenizer, messages: list[dict], where: str
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of each assistant turn in it.

    A turn runs from the end of the generation prompt that precedes it to the end of its own
    rendering, trailing whitespace (the template's newline between turns) left out.
    """
    text = _render(tokenizer, messages, False, where)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], True, where)
        upto = _render(tokenizer, messages[: i + 1], False, where).rstrip()
        if not (text.startswith(upto) and upto.startswith(before)):
            raise UserError(
                f"{where}: the chat template renders the start of this conversation differently "
                "from the whole (it rewrites earlier turns), so the assistant's tokens cannot "
                "be found; use a template with {% generation %} blocks"
            )
        spans.append((len(before), len(upto)))
    return text, spans


def _from_generation_blocks(tokenizer, messages: list[dict], where: str) -> ChatExample:
    """The template marks the trained tokens itself with `{% generation %}` blocks."""
    try:
        out = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
    except TEMPLATE_ERRORS as exc:
        raise UserError(f"{where}: the chat template failed: {_first_line(exc)}") from None
    return ChatExample(list(out["input_ids"]), [int(x) for x in out["assistant_masks"]])


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool, where: str) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except TEMPLATE_ERRORS as exc:
        raise UserError(f"{where}: the chat template refused it: {_first_line(exc)}") from None


def _template_text(tokenizer) -> str:
    template = tokenizer.chat_template
    return " ".join(template.values()) if isinstance(template, dict) else str(template)


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
