"""Turning a request into model input, and generating it token by token.

* Model input: `build_prompt` of the knowledge store (the user's retrieved facts first), through
  the tokenizer's chat template when it has one. herllm-tiny has none: messages are rendered as
  plain ``role: content`` lines ending with ``assistant:``, and generation also stops at a new
  ``\\nuser:`` line.
* Generation: transformers' `generate` (so routing, sampling and the KV cache are its own) in a
  worker thread, its tokens read through `TextIteratorStreamer`. ONE inference runs at a time
  (a lock): on a 2-core CPU batching concurrent requests would not make any of them faster, and
  the learner trains while the lock is free. ``max_tokens``, ``temperature`` (0 = greedy),
  ``top_p``, ``stop`` (up to 4 strings) and ``seed`` are honoured.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

PLAIN_STOPS = ("\nuser:", "\nsystem:")


def uses_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def context_length(model) -> int:
    return int(getattr(model.config, "max_position_embeddings", 2048) or 2048)


@dataclass
class Generated:
    """What one generation produced (filled in while it streams)."""

    text: str = ""
    completion_tokens: int = 0
    finish_reason: str = "length"
    first_token_s: float | None = None
    pieces: list[str] = field(default_factory=list)


class _Cancel(StoppingCriteria):
    def __init__(self):
        self.flag = threading.Event()

    def __call__(self, input_ids, scores, **kw) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.flag.is_set(), dtype=torch.bool)


class Generator:
    """Streams text from an `AdaptedModel`, one request at a time (see module doc)."""

    def __init__(self):
        self.lock = threading.Lock()

    def stream(self, adapted, text: str, *, max_tokens: int, temperature: float, top_p: float,
               stop: list[str], seed: int | None, out: Generated) -> Iterator[str]:  # fmt: skip
        """Yield the answer's text piece by piece; `out` holds the totals when it ends."""
        tok = adapted.tokenizer
        chat = uses_template(tok)
        stops = list(stop) + ([] if chat else list(PLAIN_STOPS))
        hold = max((len(s) for s in stops), default=1) - 1  # text that may start a stop string
        enc = tok(text, return_tensors="pt", add_special_tokens=not chat)
        device = adapted.model.device
        ids, attn = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        cancel = _Cancel()
        kw = dict(max_new_tokens=max_tokens, do_sample=temperature > 0, use_cache=True,
                  pad_token_id=tok.pad_token_id, streamer=streamer,
                  stopping_criteria=StoppingCriteriaList([cancel]))  # fmt: skip
        if temperature > 0:
            kw.update(temperature=temperature, top_p=top_p, top_k=0)
        result: dict = {}

        def work():
            try:
                result["ids"] = adapted.routed(None).generate(
                    input_ids=ids, attention_mask=attn, **kw
                )
            except BaseException as exc:  # re-raised in the reading thread
                result["error"] = exc
                streamer.end()

        with self.lock:
            if seed is not None:
                torch.manual_seed(seed)
            worker = threading.Thread(target=work, name="herllm-generate", daemon=True)
            worker.start()
            sent, buf, stopped = 0, "", False
            try:
                for piece in streamer:
                    buf += piece
                    cut = min((i for s in stops if (i := buf.find(s)) >= 0), default=-1)
                    if cut >= 0:
                        buf, stopped = buf[:cut], True
                        cancel.flag.set()
                    ready = len(buf) if stopped else max(sent, len(buf) - hold)
                    if ready > sent:
                        out.pieces.append(buf[sent:ready])
                        yield buf[sent:ready]
                        sent = ready
                    if stopped:
                        break
                if stopped:  # drain what the worker still puts, so it can finish
                    for _ in streamer:
                        pass
                if sent < len(buf):
                    out.pieces.append(buf[sent:])
                    yield buf[sent:]
            finally:
                cancel.flag.set()  # a client that went away stops the generation too
                worker.join()
            if "error" in result:
                raise result["error"]
        new = result["ids"][0, ids.shape[1] :]
        out.text = buf
        out.completion_tokens = int(new.numel())
        hit_eos = tok.eos_token_id is not None and bool((new == tok.eos_token_id).any())
        out.finish_reason = "stop" if stopped or hit_eos or new.numel() < max_tokens else "length"
