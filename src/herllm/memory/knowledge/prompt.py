"""Put retrieved passages in front of a prompt, within a token budget (a pure function).

* A tokenizer with a chat template: the facts go into the system message (appended after an
  existing system message, so the operator's instructions come first), then the template is
  rendered with the generation prompt.
* Without a template: a plain preamble ``"Known facts:\\n- ...\\n\\n"`` then the prompt (chat
  messages become ``role: content`` lines ending with ``assistant:``).
* Over ``budget`` tokens, the lowest-scored hits are dropped one by one; if the prompt alone
  is over budget, no fact is added and the prompt is returned as it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from herllm.errors import UserError
from herllm.memory.knowledge.records import Hit

HEADER = "Known facts:"


@dataclass(frozen=True)
class ModelInput:
    """What to feed the model, and which hits made it in."""

    text: str
    """The model input as text (chat template rendered, or preamble + prompt)."""
    n_tokens: int
    """Tokens in ``text`` as the model will see them."""
    used: list[Hit] = field(default_factory=list)
    """Hits included, best first."""
    dropped: list[Hit] = field(default_factory=list)
    """Hits left out to fit the budget, best first."""
    messages: list[dict] | None = None
    """The messages given to the chat template (None without one)."""


def _facts(hits: Sequence[Hit], header: str) -> str:
    lines = [f"- {' '.join(h.item.text.split())}" for h in hits]
    return "\n".join([header, *lines])


def _check_messages(messages: list[dict]) -> None:
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or "role" not in m:
            raise UserError(f"chat message {i}: need {{'role': ..., 'content': str}}, got {m!r}")


def _with_system(messages: list[dict], facts: str | None) -> list[dict]:
    if facts is None:
        return [dict(m) for m in messages]
    if messages and messages[0]["role"] == "system":
        merged = {**messages[0], "content": f"{messages[0]['content']}\n\n{facts}"}
        return [merged, *(dict(m) for m in messages[1:])]
    return [{"role": "system", "content": facts}, *(dict(m) for m in messages)]


def _render(prompt, facts: str | None, tokenizer, chat: bool) -> tuple[str, list[dict] | None]:
    if chat:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        messages = _with_system(messages, facts)
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text, messages
    if not isinstance(prompt, str):
        prompt = "\n".join(f"{m['role']}: {m['content']}" for m in prompt) + "\nassistant:"
    return (prompt if facts is None else f"{facts}\n\n{prompt}"), None


def build_prompt(
    hits: Sequence[Hit],
    prompt: str | list[dict],
    tokenizer,
    *,
    budget: int | None = None,
    header: str = HEADER,
    chat: bool | None = None,
) -> ModelInput:
    """The model input for ``prompt`` (text or chat messages) with the best ``hits`` that fit
    in ``budget`` tokens (no limit when None). ``chat``: render through the chat template
    (None: when the tokenizer has one; False: the plain preamble, for text continuation)."""
    if not isinstance(prompt, str):
        _check_messages(prompt)
    if budget is not None and budget < 1:
        raise UserError(f"prompt budget {budget}: give a positive number of tokens")
    if chat is None:
        chat = bool(getattr(tokenizer, "chat_template", None))
    ranked = sorted((h for h in hits if h.item.text), key=lambda h: -h.score)
    for n in range(len(ranked), -1, -1):
        facts = _facts(ranked[:n], header) if n else None
        text, messages = _render(prompt, facts, tokenizer, chat)
        # A rendered chat template already holds its special tokens as text.
        n_tokens = len(tokenizer.encode(text, add_special_tokens=not chat))
        if budget is None or n_tokens <= budget or n == 0:
            return ModelInput(text, n_tokens, ranked[:n], ranked[n:], messages)
    raise AssertionError("unreachable: n == 0 always returns")
