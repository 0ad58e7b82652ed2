"""The distillation signal of consolidation: texts about an item, and the teacher's view of them.

The TEACHER is the model with the item's passage in its context; the STUDENT is the same model
without it. Both read the same text; the student is trained to match the teacher's next-token
distributions over it (:func:`topk_kl`). The texts about an item (:func:`teacher_samples`):

* ``prompts``: the teacher continues the first words of evenly spaced sentences of the passage
  (greedy, or sampled with a fixed seed) for ``new_tokens`` tokens;
* ``whole``: the passage itself;
* ``shuffles``: the passage's sentences in seeded random orders (each fact after other words);
* ``rewrites``: the teacher, asked by one of :data:`REWRITE_ASKS` with the passage in its
  context, writes about it (sampled, ``rewrite_tokens`` tokens; batched). A small model's
  rewrite adds facts of its own, but the loss is the teacher's distribution at each token with
  the passage in view, so an invented fact is corrected, not learned: the student learns what
  the teacher would say next, in words the passage never used. This is what lets a fact be
  recalled from a question phrased differently from the passage (Kujanpää et al. 2024,
  "Knowledge injection via prompt distillation", arXiv:2412.14964).

:func:`anchor_samples` turns held-out general text into samples whose teacher is the model as
it is before the consolidation (no passage): mixed into training they hold general text where
it was, so the retention gate accepts a learning rate that moves the facts.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from herllm.memory.knowledge.prompt import HEADER

CONTINUE = "Continue the text."
_SENTENCE = re.compile(r"(?<=[.!?])\s+")


# ---- prompts ---------------------------------------------------------------------------------


def render(tokenizer, prompt: str, passages: Sequence[str] = ()) -> str:
    """The model input that continues ``prompt`` with ``passages`` as known facts: in the system
    message of the chat template (the assistant's turn starts with ``prompt``), or without a
    template as the plain preamble of :func:`build_prompt`."""
    facts = "\n".join([HEADER, *(f"- {' '.join(p.split())}" for p in passages)])
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": facts}] if passages else []
        messages.append({"role": "user", "content": CONTINUE})
        head = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return head + prompt
    return f"{facts}\n\n{prompt}" if passages else prompt


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of a rendered input (a chat template already wrote its special tokens)."""
    chat = bool(getattr(tokenizer, "chat_template", None))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not chat and tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id, *ids]
    return ids


def passage_prompts(text: str, n: int, cut: float = 0.4) -> list[str]:
    """Up to ``n`` prompts: the first ``cut`` of the words of evenly spaced sentences."""
    sentences = [s for s in _SENTENCE.split(" ".join(text.split())) if len(s.split()) >= 4]
    if not sentences:
        return [" ".join(text.split()[:8])]
    step = max(1, len(sentences) / n)
    picked = [sentences[int(i * step)] for i in range(min(n, len(sentences)))]
    return [" ".join(s.split()[: max(2, int(len(s.split()) * cut))]) for s in picked]


# ---- the distillation signal -------------------------------------------------------------------


@dataclass
class Sample:
    """One generated continuation: the student's ids, and the teacher's top-k at its tokens."""

    student_ids: list[int]
    gen_start: int
    """Index in ``student_ids`` of the first generated token."""
    top_logp: torch.Tensor  # (G, k) teacher log-probs of its top-k tokens
    top_idx: torch.Tensor  # (G, k) their token ids


def topk_kl(top_logp: torch.Tensor, top_idx: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of the KL between teacher and student on the teacher's top-k tokens
    plus one bucket for the rest of the vocabulary:
    ``sum_k p_k (log p_k - log q_k) + p_rest (log p_rest - log q_rest)``, with p the teacher's
    probabilities and q the student's full softmax. It is >= 0 and 0 when the student puts the
    teacher's mass on each top-k token and on the rest, so it does not reward a student for
    being surer than its teacher (a renormalised top-k would: its floor is at all mass on the
    top-k). top_logp, top_idx: (G, k); logits: (G, V)."""
    student = F.log_softmax(logits.float(), dim=-1).gather(-1, top_idx)  # (G, k)
    p = top_logp.exp()
    kl = (p * (top_logp - student)).sum(-1)  # (G,)
    p_rest = (1.0 - p.sum(-1)).clamp_min(0.0)
    log_q_rest = torch.log1p(-student.exp().sum(-1).clamp(max=1.0 - 1e-6))
    rest = p_rest * (torch.log(p_rest.clamp_min(1e-12)) - log_q_rest)
    return (kl + rest).mean()


@torch.no_grad()
def generate_batched(model, heads: Sequence[list[int]], new_tokens: int, *, sample: bool,
                     pad_id: int, eos_id: int | None, seed: int, batch: int = 8) -> list[list[int]]:  # fmt: skip
    """What ``model`` writes after each of ``heads`` (token ids), in left-padded batches; a
    sampled batch (top-k 50, temperature 0.8) is seeded with ``seed`` + its first index. Each
    continuation ends at its first ``eos_id`` (kept) or after ``new_tokens`` tokens."""
    out = []
    for i in range(0, len(heads), batch):
        chunk = heads[i : i + batch]
        width = max(len(h) for h in chunk)
        ids = torch.tensor([[pad_id] * (width - len(h)) + h for h in chunk], device=model.device)
        mask = torch.tensor([[0] * (width - len(h)) + [1] * len(h) for h in chunk],
                            device=model.device)  # fmt: skip
        torch.manual_seed(seed + i)
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                             do_sample=sample, temperature=0.8 if sample else None,
                             top_k=50 if sample else None, top_p=None, pad_token_id=pad_id,
                             eos_token_id=eos_id, use_cache=True)  # fmt: skip
        for row in gen[:, width:].tolist():
            if eos_id is not None and eos_id in row:
                row = row[: row.index(eos_id) + 1]
            out.append(row)
    return out


@torch.no_grad()
def _prompt_samples(model, tokenizer, passage: str, prompts: int, new_tokens: int, topk: int,
                    sample: bool, seed: int) -> list[Sample]:  # fmt: skip
    """The teacher (``model`` with ``passage`` in context) continues prompts from the passage."""
    model.eval()
    cut = passage_prompts(passage, prompts) if prompts else []
    heads = [encode(tokenizer, render(tokenizer, prompt, [passage])) for prompt in cut]
    gens = generate_batched(model, heads, new_tokens, sample=sample, seed=seed,
                            pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id)  # fmt: skip
    out = []
    for prompt, teacher, gen in zip(cut, heads, gens, strict=True):
        if not gen:
            continue
        full = torch.tensor([teacher + gen], device=model.device)
        logits = model(input_ids=full).logits[0, len(teacher) - 1 : -1]  # (G, V)
        top, idx = _topk(logits, topk)
        student = encode(tokenizer, render(tokenizer, prompt))
        out.append(Sample(student + gen, len(student), top, idx))
    return out


def _topk(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of the top-k tokens of each row and their ids; (G, k) each, on CPU."""
    top, idx = logits.float().log_softmax(-1).topk(min(k, logits.shape[-1]), dim=-1)
    return top.cpu(), idx.cpu()


REWRITE_ASKS = (
    "Rewrite the text in your own words.",
    "Retell the facts of the text in a different order.",
    "Write a short encyclopedia entry using these facts.",
    "What are the key facts in the text? Write each as a full sentence.",
)
"""What the teacher is asked for a rewrite (cycled over an item's rewrites)."""


def shuffled(passage: str, n: int, seed: int) -> list[str]:
    """``n`` versions of ``passage`` with its sentences in seeded random orders (fewer when it
    has too few sentences to reorder)."""
    sentences = [s for s in _SENTENCE.split(" ".join(passage.split())) if s]
    if len(sentences) < 2:
        return []
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        order = sentences[:]
        rng.shuffle(order)
        out.append(" ".join(order))
    return out


@torch.no_grad()
def rewrites(model, tokenizer, passage: str, n: int, new_tokens: int, seed: int) -> list[str]:
    """``n`` texts the model writes about ``passage`` with it in context (sampled, seeded);
    the ones under 4 words are dropped."""
    model.eval()
    heads = [encode(tokenizer, _ask(tokenizer, REWRITE_ASKS[j % len(REWRITE_ASKS)], passage))
             for j in range(n)]  # fmt: skip
    gens = generate_batched(model, heads, new_tokens, sample=True, seed=seed,
                            pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id)  # fmt: skip
    out = [tokenizer.decode(g, skip_special_tokens=True).strip() for g in gens]
    return [t for t in out if len(t.split()) >= 4]


def _ask(tokenizer, ask: str, passage: str) -> str:
    facts = f"{HEADER}\n- {' '.join(passage.split())}"
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": facts}, {"role": "user", "content": ask}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return f"{facts}\n\n{ask}\n"


@torch.no_grad()
def text_samples(model, tokenizer, passage: str, texts: Sequence[str], topk: int,
                 max_tokens: int = 384) -> list[Sample]:  # fmt: skip
    """The teacher's view of whole ``texts`` (each cut to ``max_tokens`` tokens): the student
    reads the text after the closed-book head, the teacher after the head with the passage."""
    model.eval()
    t_head = encode(tokenizer, render(tokenizer, "", [passage]))
    s_head = encode(tokenizer, render(tokenizer, ""))
    out = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
        if len(ids) < 2:
            continue
        logits = model(input_ids=torch.tensor([t_head + ids], device=model.device)).logits[0]
        top, idx = _topk(logits[len(t_head) - 1 : -1], topk)  # (G, k): predicting every token
        out.append(Sample(s_head + ids, len(s_head), top, idx))
    return out


def teacher_samples(model, tokenizer, passage: str, *, prompts: int = 8, new_tokens: int = 32,
                    whole: bool = False, shuffles: int = 0, rewrites_n: int = 0,
                    rewrite_tokens: int = 160, topk: int = 32, sample: bool = False,
                    seed: int = 0) -> list[Sample]:  # fmt: skip
    """Every text about ``passage`` that the settings ask for (module doc), with the teacher's
    top-k at each of its tokens."""
    out = _prompt_samples(model, tokenizer, passage, prompts, new_tokens, topk, sample, seed)
    texts = ([" ".join(passage.split())] if whole else []) + shuffled(passage, shuffles, seed)
    if rewrites_n:
        texts += rewrites(model, tokenizer, passage, rewrites_n, rewrite_tokens, seed)
    return out + text_samples(model, tokenizer, passage, texts, topk)


@torch.no_grad()
def anchor_samples(model, windows: Sequence[Sequence[int]], topk: int = 32) -> list[Sample]:
    """General-text windows (token ids) whose teacher is ``model`` as it is now: training on
    them holds its next-token distributions there."""
    model.eval()
    out = []
    for ids in windows:
        ids = list(ids)
        logits = model(input_ids=torch.tensor([ids], device=model.device)).logits[0]
        top, idx = _topk(logits[:-1], topk)
        out.append(Sample(ids, 1, top, idx))
    return out


def pad_right(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (B, T) ids and attention mask of token-id rows, on ``device``."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


def _sample_losses(model, samples: list[Sample], pad_id: int) -> torch.Tensor:
    """(B,) top-k KL of the student at each sample of a batch (with grad when training)."""
    ids, mask = pad_right([s.student_ids for s in samples], pad_id, model.device)
    logits = model(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
    losses = []
    for i, s in enumerate(samples):
        g = s.top_idx.shape[0]
        rows = logits[i, s.gen_start - 1 : s.gen_start - 1 + g]  # (G, V)
        losses.append(topk_kl(s.top_logp.to(rows.device), s.top_idx.to(rows.device), rows))
    return torch.stack(losses)


def batch_kl(model, samples: list[Sample], pad_id: int) -> torch.Tensor:
    """Mean top-k KL of the student over a batch of samples (with grad when training)."""
    return _sample_losses(model, samples, pad_id).mean()


@torch.no_grad()
def sample_kls(model, samples: list[Sample], pad_id: int, batch_size: int = 8) -> list[float]:
    """KL(teacher || student) of each of ``samples``, in their order; no grad, batched by
    length."""
    was = model.training
    model.eval()
    order = sorted(range(len(samples)), key=lambda i: len(samples[i].student_ids))
    out = [0.0] * len(samples)
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size]
        losses = _sample_losses(model, [samples[j] for j in idx], pad_id)
        for j, v in zip(idx, losses.tolist(), strict=True):
            out[j] = v
    model.train(was)
    return out


def student_kl(model, samples: list[Sample], pad_id: int, batch_size: int = 8) -> float:
    """Mean KL(teacher || student) over ``samples``, no grad (batched by length)."""
    kls = sample_kls(model, samples, pad_id, batch_size)
    return sum(kls) / max(len(kls), 1)


def save_samples(path: str | Path, samples: Sequence[Sample], meta: dict[str, str]) -> None:
    """Write ``samples`` (ids, the teacher's top-k) and string ``meta`` to a safetensors file."""
    tensors = {}
    for i, s in enumerate(samples):
        tensors[f"{i}.ids"] = torch.tensor(s.student_ids, dtype=torch.int32)
        tensors[f"{i}.top_logp"] = s.top_logp.detach().float().cpu().contiguous()
        tensors[f"{i}.top_idx"] = s.top_idx.detach().to(torch.int32).cpu().contiguous()
    starts = json.dumps([s.gen_start for s in samples])
    save_file(tensors, str(path), metadata={**meta, "gen_start": starts})


def load_samples(path: str | Path) -> tuple[list[Sample], dict[str, str]]:
    """The samples and metadata :func:`save_samples` wrote."""
    with safe_open(str(path), "pt") as fh:
        meta = dict(fh.metadata() or {})
    tensors = load_file(str(path))
    samples = [Sample(tensors[f"{i}.ids"].tolist(), start, tensors[f"{i}.top_logp"],
                      tensors[f"{i}.top_idx"].long())
               for i, start in enumerate(json.loads(meta.pop("gen_start")))]  # fmt: skip
    return samples, meta
