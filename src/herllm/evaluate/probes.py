"""Multiple-choice knowledge probes scored by the model's log-likelihood of each choice.

For an item with prompt ``p`` and choices ``c_1..c_4`` the model scores the
text ``p + " " + c_k`` and sums the log-probabilities of the tokens of
``" " + c_k`` given everything before them. Two accuracies are reported:

- ``acc_sum``: argmax of the summed log-probability.
- ``acc_mean``: argmax of the mean log-probability per choice token.

``acc_mean`` is the primary figure. The probes' choices differ in length
(definitions, docstrings, second halves of lines), and a sum penalises every
extra token, so ``acc_sum`` mostly rewards the shortest choice; averaging per
token removes that bias (the "length-normalised" accuracy of lm-eval-harness).
The builder draws distractors near the answer's length, which keeps the two
close; both are returned so that a reader can see the gap. Measured caveat
(bundled base model, docs/base_model.md): on items whose choices are short
names split into several tokens (kjv book: 18.5% mean vs 42% sum), the mean
favours long names whose later tokens are predictable, so read ``acc_sum``
there; learned/forgotten deltas use the same metric before and after, so
either is consistent.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Protocol

import torch


class _Item(Protocol):
    prompt: str
    choices: Sequence[str]
    answer: int


def _encode(tokenizer, item: _Item) -> list[tuple[list[int], int]]:
    """Token ids of each ``prompt + " " + choice`` and the index where the choice starts."""
    prompt_ids = tokenizer(item.prompt)["input_ids"]
    out = []
    for choice in item.choices:
        ids = tokenizer(item.prompt + " " + choice)["input_ids"]
        start = len(prompt_ids)
        # byte-level BPE keeps the prompt a prefix; if a merge crosses the seam, find the split
        while start > 0 and ids[:start] != prompt_ids[:start]:
            start -= 1
        out.append((ids, max(1, start)))
    return out


@torch.no_grad()
def choice_logprobs(model, tokenizer, items: Sequence[_Item], batch_size: int = 16,
                    max_length: int = 512) -> list[list[tuple[float, int]]]:  # fmt: skip
    """Per item, per choice: (sum of choice-token log-probs, number of choice tokens)."""
    seqs = []  # (item index, ids, choice start)
    for i, item in enumerate(items):
        for ids, start in _encode(tokenizer, item):
            cut = max(
                0, len(ids) - max_length
            )  # keep the choice; drop the prompt's head if too long
            seqs.append((i, ids[cut:], max(1, start - cut)))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    results: list[list[tuple[float, int]]] = [[] for _ in items]
    for b in range(0, len(seqs), batch_size):
        chunk = seqs[b : b + batch_size]
        width = max(len(ids) for _, ids, _ in chunk)
        x = torch.full((len(chunk), width), pad, dtype=torch.long)  # (B, T), right-padded
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, (_, ids, _) in enumerate(chunk):
            x[r, : len(ids)] = torch.tensor(ids)
            mask[r, : len(ids)] = 1
        logits = model(input_ids=x.to(device), attention_mask=mask.to(device)).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)  # (B, T-1, V): predicts token t+1
        tok_lp = logp.gather(-1, x[:, 1:].to(device).unsqueeze(-1)).squeeze(-1)  # (B, T-1)
        for r, (i, ids, start) in enumerate(chunk):
            lp = tok_lp[r, start - 1 : len(ids) - 1]  # log p(choice tokens | prefix)
            results[i].append((float(lp.sum()), int(lp.numel())))
    model.train(was_training)
    return results


def probe_accuracy(model, tokenizer, items: Sequence[_Item], batch_size: int = 16) -> dict:
    """Accuracy of ``items`` overall and per ``kind/split`` group.

    Returns ``{"n", "acc_mean" (primary), "acc_sum", "chance": 0.25,
    "groups": {"kind/split": {"n", "acc_mean", "acc_sum"}}}``. Items without
    ``kind``/``split`` attributes are grouped under ``"all"``.
    """
    if not items:
        raise ValueError("probe_accuracy got no items; pass at least one probe item")
    for item in items:
        if not 0 <= item.answer < len(item.choices):
            raise ValueError(f"probe item {getattr(item, 'id', item.prompt[:40])!r} has answer "
                             f"{item.answer} outside its {len(item.choices)} choices")  # fmt: skip
    scores = choice_logprobs(model, tokenizer, items, batch_size)
    groups: dict[str, list[tuple[bool, bool]]] = defaultdict(list)
    for item, sc in zip(items, scores, strict=True):
        best_sum = max(range(len(sc)), key=lambda k: sc[k][0])
        best_mean = max(range(len(sc)), key=lambda k: sc[k][0] / max(1, sc[k][1]))
        key = f"{getattr(item, 'kind', 'all')}/{getattr(item, 'split', 'all')}"
        groups[key].append((best_mean == item.answer, best_sum == item.answer))
    hits = [h for g in groups.values() for h in g]
    return {
        "n": len(hits),
        "acc_mean": sum(m for m, _ in hits) / len(hits),
        "acc_sum": sum(s for _, s in hits) / len(hits),
        "chance": 0.25,
        "groups": {k: {"n": len(g), "acc_mean": sum(m for m, _ in g) / len(g),
                       "acc_sum": sum(s for _, s in g) / len(g)} for k, g in sorted(groups.items())},
    }  # fmt: skip
