"""The knowledge benchmark's probing: greedy continuations (batched, left-padded) scored by
exact match, the target's NLL in one right-padded pass, and the documents retrieval brought."""

from __future__ import annotations

import numpy as np
import torch

from herllm.evaluate.knowledge import exact_match, recall_at_k, target_nll
from herllm.memory.knowledge.distil import encode, render

KINDS = ("mem", "gen", "hard_gen")


class Prober:
    """Scores probes of documents: EM of the greedy continuation, target NLL, retrieved docs."""

    def __init__(self, tokenizer, docs: list[dict], batch: int = 16):
        self.tok, self.docs, self.batch = tokenizer, docs, batch

    def probes(self, doc_ids: list[int]) -> list[tuple[int, str, str, str]]:
        return [(d, kind, p, t) for d in doc_ids for kind in KINDS
                for p, t in zip(self.docs[d][f"{kind}_input"], self.docs[d][f"{kind}_target"], strict=True)]  # fmt: skip

    @torch.no_grad()
    def score(self, model, doc_ids: list[int], context=None) -> list[dict]:
        """``context(doc, prompt) -> (passages, retrieved_doc_ids)``; None: no context."""
        model.eval()
        rows = []
        for d, kind, prompt, target in self.probes(doc_ids):
            passages, got = context(d, prompt) if context else ([], [])
            rows.append({"doc": d, "kind": kind, "target": target, "retrieved": got,
                         "ids": encode(self.tok, render(self.tok, prompt, passages)),
                         "tgt": self.tok(" " + target.strip(), add_special_tokens=False)["input_ids"]})  # fmt: skip
        for i in range(0, len(rows), self.batch):
            self._batch(model, rows[i : i + self.batch])
        return [{k: r[k] for k in ("doc", "kind", "em", "nll", "retrieved")} for r in rows]

    def _batch(self, model, rows: list[dict]) -> None:
        pad, dev = self.tok.pad_token_id, model.device
        width = max(len(r["ids"]) for r in rows)
        ids = torch.tensor([[pad] * (width - len(r["ids"])) + r["ids"] for r in rows], device=dev)
        mask = torch.tensor(
            [[0] * (width - len(r["ids"])) + [1] * len(r["ids"]) for r in rows], device=dev
        )  # fmt: skip  (B, T) left-padded for generation
        new = max(len(r["tgt"]) for r in rows) + 2
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new,
                             do_sample=False, pad_token_id=pad, use_cache=True,
                             temperature=None, top_p=None, top_k=None)  # fmt: skip
        full = [r["ids"] + r["tgt"] for r in rows]  # target NLL: one right-padded pass
        w2 = max(len(f) for f in full)
        x = torch.tensor([f + [pad] * (w2 - len(f)) for f in full], device=dev)
        m = torch.tensor([[1] * len(f) + [0] * (w2 - len(f)) for f in full], device=dev)
        logits = model(input_ids=x, attention_mask=m).logits.float()  # (B, T, V)
        for j, r in enumerate(rows):
            cont = self.tok.decode(out[j, width:], skip_special_tokens=True)
            r["em"] = float(exact_match(cont, r["target"]))
            n, t = len(r["ids"]), len(r["tgt"])
            r["nll"] = target_nll(logits[j, n - 1 : n - 1 + t].cpu().numpy(), r["tgt"])


def summarize_probes(scored: list[dict], k: int) -> dict:
    out = {}
    for kind in KINDS:
        rows = [r for r in scored if r["kind"] == kind]
        out[f"{kind}_em"] = float(np.mean([r["em"] for r in rows])) if rows else None
        out[f"{kind}_nll"] = float(np.mean([r["nll"] for r in rows])) if rows else None
    if scored and scored[0]["retrieved"]:
        retrieved, truth = [r["retrieved"] for r in scored], [str(r["doc"]) for r in scored]
        out["recall@1"], out[f"recall@{k}"] = (recall_at_k(retrieved, truth, 1),
                                               recall_at_k(retrieved, truth, k))  # fmt: skip
    return out
