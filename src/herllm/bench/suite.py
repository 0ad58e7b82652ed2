"""The benchmark's evaluator: held-out loss per domain and general, probes, intrinsic signals,
and the quality figures of a run (`run_metrics`).

Only the evaluator knows domain labels; the learner never sees them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from herllm.acquire.chunks import Packer, to_batch
from herllm.acquire.sources import Document
from herllm.evaluate import metrics as M
from herllm.refine.scoring import mean_nll


def pack_batches(
    docs: list[str], tokenizer, seq_len: int, max_windows: int, batch_size: int = 8
) -> list[dict]:
    """The first `max_windows` packed windows of `docs`, as model batches."""
    packer = Packer(tokenizer, seq_len)
    windows = []
    for w in packer.windows(Document(f"eval#{i}", d) for i, d in enumerate(docs)):
        windows.append(w)
        if len(windows) >= max_windows:
            break
    return [to_batch(windows[i : i + batch_size]) for i in range(0, len(windows), batch_size)]


@dataclass
class EvalSuite:
    """Fixed held-out sets: one per domain (stream order given per call), plus general."""

    domain_batches: dict[str, list[dict]]
    general_batches: list[dict]
    probes: dict[str, list] = field(default_factory=dict)
    instruct_batches: list[dict] = field(default_factory=list)
    """The base model's answers to fixed instructions (`evaluate.instruct`); empty = not scored."""

    def losses(self, model, order: list[str]) -> tuple[list[float], float]:
        """Held-out NLL per domain (in `order`) and on the general set."""
        per_domain = [mean_nll(model, self.domain_batches[d])[0] for d in order]
        return per_domain, mean_nll(model, self.general_batches)[0]

    def instruct_loss(self, model) -> float | None:
        """Mean NLL of the base model's instruction answers under `model` (None when not scored)."""
        return mean_nll(model, self.instruct_batches)[0] if self.instruct_batches else None

    def probe_accuracy(self, model, tokenizer, order: list[str]) -> list[float] | None:
        """Multiple-choice probe accuracy per domain (in `order`), or None without probes."""
        if not self.probes:
            return None
        from herllm.evaluate.probes import probe_accuracy

        out = []
        for d in order:
            items = self.probes.get(d, [])
            out.append(
                probe_accuracy(model, tokenizer, items)["acc_mean"] if items else float("nan")
            )
        return out


PROMPTS = ("The", "In the beginning", "def ", "Chapter 1\n\n", "SELECT")


@torch.no_grad()
def intrinsic_signals(
    model, tokenizer, batches: list[dict], seed: int = 0, new_tokens: int = 48
) -> dict:
    """Label-free signals on a fixed probe set: entropy, CKA to the base, generation quality."""
    from herllm.evaluate.intrinsic import (
        collect_hidden_states,
        distinct_n,
        layerwise_cka,
        mean_token_entropy,
        mean_token_nll,
        repetition_rate,
        samples_to_batches,
    )

    model.eval()
    entropy = mean_token_entropy(model, batches)
    current = collect_hidden_states(model, batches[:2], pooling="token")
    with model.disable_adapter():
        base = collect_hidden_states(model, batches[:2], pooling="token")
        base_entropy = mean_token_entropy(model, batches)
    torch.manual_seed(seed)
    samples, prompt_lens = [], []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        if tokenizer.bos_token_id is not None:
            ids = torch.cat([torch.tensor([[tokenizer.bos_token_id]]), ids], dim=1)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             do_sample=True, top_k=50, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        samples.append(out[0].tolist())
        prompt_lens.append(ids.shape[1])
    generated = [s[p:] for s, p in zip(samples, prompt_lens, strict=True)]
    gen_batches = samples_to_batches(samples, 8, tokenizer.pad_token_id, prompt_lengths=prompt_lens)
    with model.disable_adapter():
        gen_nll_base = mean_token_nll(model, gen_batches)
    return {
        "entropy": entropy,
        "entropy_base": base_entropy,
        "cka": layerwise_cka(current, base),
        "distinct_1": distinct_n(generated, 1),
        "distinct_2": distinct_n(generated, 2),
        "repetition": repetition_rate(generated, 4),
        "gen_nll_base": gen_nll_base,
        "samples": [tokenizer.decode(s, skip_special_tokens=True) for s in samples[:3]],
    }


def finite_or_none(x: float) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


def switch_indices(trace: list[dict], streamed: bool = True) -> list[int]:
    """Trace index of the evaluation at the start of each domain (the first is 0); a run
    without a domain stream (`base`, `joint`) has only the first."""
    if not streamed:
        return [0]
    starts, prev = [0], 0
    for idx, r in enumerate(trace):
        if r["segment"] != prev:
            starts.append(idx - 1)
            prev = r["segment"]
    return starts


def run_metrics(L, P, general, trace: list[dict], streamed: bool = True, instruct=None) -> dict:
    """A run's quality figures; forgetting, transfer, plasticity and adaptation only for a run
    that streamed two or more domains one after another. `instruct`: the base model's
    instruction answers' NLL after each domain (None when not scored)."""
    out = {"avg_final_loss": M.average_final_loss(L), "avg_final_ppl": M.average_perplexity(L),
           "general_delta": M.general_ability_delta(general)}  # fmt: skip
    if instruct is not None and instruct[0] is not None:
        out["instruct_delta"] = finite_or_none(M.general_ability_delta(instruct))
    if P is not None:
        out["avg_final_acc"] = finite_or_none(M.average_accuracy(P))
    if not streamed or L.shape[1] < 2:
        return out
    steps = np.arange(len(trace))
    losses = np.array([r["losses"] for r in trace])
    switch = switch_indices(trace)[1:]
    speed = M.adaptation_speed(
        steps, losses, switch, [r["tokens"] for r in trace], [r["seconds"] for r in trace]
    )
    out |= {
        "bwt_loss": M.backward_transfer(-L), "forgetting_loss": M.forgetting_loss(L),
        "fwt_loss": M.forward_transfer(-L), "plasticity": M.plasticity(L),
        "stability_gap": M.stability_gap(steps, losses, switch).mean,
        "adapt_tokens_mean": float(np.nanmean(speed.tokens)), "adapt_seconds_mean": float(np.nanmean(speed.seconds)),
    }  # fmt: skip
    if P is not None:
        out["forgetting_acc"] = finite_or_none(M.forgetting(P))
        out["bwt_acc"] = finite_or_none(M.backward_transfer(P))
    return {k: finite_or_none(v) for k, v in out.items()}
