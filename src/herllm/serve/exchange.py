"""One exchange from request to log row: check, retrieve, render, generate, log, remember.

The order matters for the guarantees of `herllm.serve`: everything that can be refused is
checked before any generation (a refused request leaves nothing behind), and the exchange is
written to the interaction log after generation and BEFORE the response's final bytes. Then the
user's stated fact goes into their knowledge-store scope, so their next request can use it.

Facts a user states (a documented rule): the newest user message of a chat request, when it
is a statement (it does not end with ``?`` and has at least 3 words), is stored as one item in
that user's scope ``user:NAME``. Retrieval searches that scope only (k=3); the facts found go
in front of the conversation (`build_prompt`). Another user's scope is never searched.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

from herllm.memory.knowledge import Scope, build_prompt
from herllm.serve.errors import ApiError
from herllm.serve.generation import Generated, context_length
from herllm.serve.log import Exchange

FACT_MIN_WORDS = 3
FACT_MAX_CHARS = 2000
RETRIEVE_K = 3
RETRIEVE_THRESHOLD = 0.05


@dataclass(frozen=True)
class Limits:
    """What one request may ask for."""

    max_message_chars: int = 32_000
    """Characters of all messages (or the prompt) together."""
    max_tokens: int = 512
    """The most completion tokens a request may ask for."""
    default_max_tokens: int = 128
    """Completion tokens when a request does not say."""


@dataclass
class Prepared:
    """A checked request, ready to generate."""

    id: str
    kind: str
    user: str
    version: str
    adapted: object
    messages: list[dict]
    model_input: str
    train_prompt: str
    prompt_tokens: int
    max_tokens: int
    facts: list[str] = field(default_factory=list)
    created: int = field(default_factory=lambda: int(time.time()))


def is_statement(text: str) -> bool:
    text = text.strip()
    return not text.endswith("?") and len(text.split()) >= FACT_MIN_WORDS


def remember(store, text: str, p: Prepared) -> None:
    """A user's statement into their scope: one item, or, over `FACT_MAX_CHARS`, its passages
    (the store's splitter, offsets kept), so a long message is kept whole, not dropped."""
    scope = Scope("user", p.user)
    if len(text) <= FACT_MAX_CHARS:
        store.add(text, scope=scope, doc_id=p.id, source="chat", actor=p.user)
    else:
        store.ingest_document(text, p.id, scope, "chat", actor=p.user)


def prepare(deps, user: str, req, kind: str) -> Prepared:
    """Check a chat or completion request against the limits and render it (no generation)."""
    if req.model not in deps.model_ids():
        raise ApiError(404, f"The model '{req.model}' does not exist; GET /v1/models lists "
                       f"{', '.join(deps.model_ids())}", param="model", code="model_not_found")  # fmt: skip
    if kind == "chat":
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in req.messages]  # fmt: skip
        size = sum(len(m["content"]) for m in messages)
    else:
        messages, size = [], len(req.prompt)
    lim = deps.limits
    if size > lim.max_message_chars:
        raise ApiError(400, f"the messages hold {size} characters; at most "
                       f"{lim.max_message_chars} are accepted", param="messages",
                       code="messages_too_long")  # fmt: skip
    wanted = req.wanted_tokens()
    if wanted is not None and wanted > lim.max_tokens:
        raise ApiError(400, f"max_tokens is {wanted}; this server gives at most {lim.max_tokens}",
                       param="max_tokens", code="max_tokens_too_large")  # fmt: skip
    max_tokens = wanted or lim.default_max_tokens
    version, adapted = deps.versions.current()
    tok = adapted.tokenizer
    ctx = context_length(adapted.model)
    hits = []
    if kind == "chat":
        query = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        if deps.store is not None and query.strip():
            hits = deps.store.search(query, scope=Scope("user", user), k=RETRIEVE_K,
                                     threshold=RETRIEVE_THRESHOLD)  # fmt: skip
        mi = build_prompt(hits, messages, tok, budget=max(1, ctx - max_tokens))
        text, n_tokens, used = mi.text, mi.n_tokens, [h.item.id for h in mi.used]
        train_prompt = build_prompt([], messages, tok).text
    else:
        text = train_prompt = req.prompt
        n_tokens, used = len(tok(text)["input_ids"]), []
    if n_tokens + max_tokens > ctx:
        raise ApiError(400, f"This model's maximum context length is {ctx} tokens; the request "
                       f"has {n_tokens} in its messages and asks for {max_tokens} more",
                       param="messages", code="context_length_exceeded")  # fmt: skip
    prefix = "chatcmpl-" if kind == "chat" else "cmpl-"
    return Prepared(prefix + uuid.uuid4().hex[:24], kind, user, version, adapted, messages, text,
                    train_prompt, n_tokens, max_tokens, used)  # fmt: skip


def run(deps, p: Prepared, req) -> Iterator[str]:
    """Generate `p`, yielding text pieces; when it ends, log the exchange and remember the
    user's fact. Returns (StopIteration.value) the `Generated` totals."""
    out = Generated()
    start = time.perf_counter()
    route = "/v1/chat/completions" if p.kind == "chat" else "/v1/completions"
    for piece in deps.generator.stream(p.adapted, p.model_input, max_tokens=p.max_tokens,
                                       temperature=req.temperature, top_p=req.top_p,
                                       stop=req.stop or [], seed=req.seed, out=out):  # fmt: skip
        if out.first_token_s is None:
            out.first_token_s = time.perf_counter() - start
            deps.metrics.ttft.labels(route).observe(out.first_token_s)
        yield piece
    deps.log.append(Exchange(p.id, p.kind, p.user, deps.model_name, p.version, p.messages,
                             p.train_prompt, out.text, out.finish_reason, p.prompt_tokens,
                             out.completion_tokens, facts=p.facts))  # fmt: skip
    deps.metrics.exchanges.inc()
    deps.metrics.tokens.labels("prompt").inc(p.prompt_tokens)
    deps.metrics.tokens.labels("completion").inc(out.completion_tokens)
    if p.kind == "chat" and deps.store is not None:
        last = p.messages[-1]
        if last["role"] == "user" and is_statement(last["content"]):
            remember(deps.store, last["content"], p)
    return out
