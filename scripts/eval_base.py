"""Record the bundled base model's quality into docs/base_model.md.

    python scripts/eval_base.py [--model src/herllm/assets/herllm-tiny] [--out docs/base_model.md]

Figures: held-out general perplexity vs an add-one unigram over the same
tokenizer (trained on the general train split), zero-shot perplexity on every
stream domain's test split, probe accuracy per domain/kind/split vs chance
(25%) and vs the shortcut baselines in the corpus manifest, and a few samples.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from herllm.acquire import corpus as data
from herllm.evaluate.probes import probe_accuracy

SEQ = 256
MAX_WINDOWS = 400  # ~100k tokens per split: enough for a stable perplexity, ~1 min on 2 cores
PROMPTS = ["The LORD is my shepherd", "def parse_args(", "SQLite is a", "Blessed are they"]


def token_stream(tok, docs: list[str]) -> np.ndarray:
    """``<s> doc </s>`` for every document, concatenated (same framing as pretraining)."""
    ids = tok(docs, verbose=False)["input_ids"]  # long docs are fine: we cut windows ourselves
    return np.fromiter((t for seq in ids for t in [*seq, tok.eos_token_id]), dtype=np.int64)


@torch.no_grad()
def model_nll(model, stream: np.ndarray, batch: int = 16) -> tuple[float, int]:
    """Mean next-token NLL over non-overlapping SEQ+1 windows (at most MAX_WINDOWS)."""
    n = min(MAX_WINDOWS, (len(stream) - 1) // SEQ)
    total, count = 0.0, 0
    for b in range(0, n, batch):
        rows = [stream[r * SEQ : r * SEQ + SEQ + 1] for r in range(b, min(n, b + batch))]
        x = torch.from_numpy(np.stack(rows))  # (B, SEQ+1)
        logits = model(input_ids=x[:, :-1]).logits  # (B, SEQ, V)
        nll = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), x[:, 1:].flatten(), reduction="sum"
        )
        total += float(nll)
        count += x[:, 1:].numel()
    return total / count, count


def unigram_nll(train: np.ndarray, stream: np.ndarray, vocab: int) -> float:
    """Add-one smoothed unigram NLL on the same target tokens as :func:`model_nll`."""
    counts = np.bincount(train, minlength=vocab).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    n = min(MAX_WINDOWS, (len(stream) - 1) // SEQ)
    targets = np.concatenate([stream[r * SEQ + 1 : r * SEQ + SEQ + 1] for r in range(n)])
    return float(-logp[targets].mean())


def perplexities(model, tok) -> list[tuple[str, float, float | None, int]]:
    """(split, model ppl, unigram ppl or None, tokens) for general test and each domain test."""
    train = token_stream(tok, data.load_documents(data.GENERAL, "train"))
    rows = []
    for domain in (data.GENERAL, *data.DOMAINS):
        stream = token_stream(tok, data.load_documents(domain, "test"))
        nll, n = model_nll(model, stream)
        uni = unigram_nll(train, stream, len(tok))
        rows.append((f"{domain}/test", math.exp(nll), math.exp(uni), n))
        print(
            f"{domain}/test ppl {math.exp(nll):.2f} (unigram {math.exp(uni):.1f}, {n} tokens)",
            flush=True,
        )
    return rows


def probe_table(model, tok) -> list[tuple[str, int, float, float, float, float]]:
    """(domain kind/split, n, acc_mean, acc_sum, longest baseline, overlap baseline)."""
    shortcuts = data.manifest()["shortcuts"]
    rows = []
    for domain in (*data.DOMAINS, data.GENERAL):
        res = probe_accuracy(model, tok, data.load_probes(domain), batch_size=32)
        groups = res["groups"]
        if domain == data.GENERAL:  # one row for the whole sanity quiz
            sc = list(shortcuts[domain].values())
            n = sum(s["n"] for s in sc)
            lon = sum(s["longest"] * s["n"] for s in sc) / n
            ovl = sum(s["overlap"] * s["n"] for s in sc) / n
            rows.append(("general quiz (all)", res["n"], res["acc_mean"], res["acc_sum"], lon, ovl))
            continue
        for key, g in groups.items():
            sc = shortcuts[domain][key]
            rows.append(
                (
                    f"{domain} {key}",
                    g["n"],
                    g["acc_mean"],
                    g["acc_sum"],
                    sc["longest"],
                    sc["overlap"],
                )
            )
        print(f"{domain}: acc_mean {res['acc_mean']:.3f} over {res['n']} items", flush=True)
    return rows


def samples(model, tok) -> list[tuple[str, str]]:
    """Greedy-free samples (top-k 50, temperature 0.8, seed 0) for a few prompts."""
    torch.manual_seed(0)
    out = []
    for p in PROMPTS:
        ids = tok(p, return_tensors="pt")["input_ids"]
        gen = model.generate(ids, max_new_tokens=60, do_sample=True, top_k=50, temperature=0.8)
        out.append((p, tok.decode(gen[0, ids.shape[1] :], skip_special_tokens=True)))
    return out


def render(model_dir: Path, ppl: list, probes: list, gens: list, seconds: float) -> str:
    """The markdown section."""
    info = (
        json.loads((model_dir / "training_summary.json").read_text())
        if (model_dir / "training_summary.json").exists()
        else {}
    )
    lines = [
        "## Bundled base model `herllm-tiny`",
        "",
        f"Measured {datetime.date.today().isoformat()} on a 2-core CPU VM (no GPU), "
        f"torch {torch.__version__}, Python {platform.python_version()}; eval took {seconds:.0f} s.",
        "",
        "Command: `python scripts/eval_base.py --model src/herllm/assets/herllm-tiny`",
        "",
    ]
    history = info.pop("val_history", [])
    if info:
        lines += ["Training: " + ", ".join(f"{k} {v}" for k, v in info.items()), ""]
    if history:
        curve = ", ".join(f"{step}: {loss:.3f}" for step, loss in history)
        lines += [f"Held-out loss by step (first 64 x 256-token general test windows): {curve}", ""]
    lines += ["### Perplexity (non-overlapping 256-token windows, up to ~100k tokens per split)", "",
              "| split | model ppl | add-one unigram ppl | tokens |", "| --- | ---: | ---: | ---: |"]  # fmt: skip
    lines += [f"| {s} | {m:.2f} | {u:.1f} | {n:,} |" for s, m, u, n in ppl]
    lines += ["", "### Probe accuracy (4-way; chance 25%; primary: mean log-prob per choice token)", "",
              "| probe | n | acc (mean) | acc (sum) | longest-choice | max-overlap |",
              "| --- | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    lines += [
        f"| {k} | {n} | {m:.1%} | {s:.1%} | {lo:.1%} | {ov:.1%} |" for k, n, m, s, lo, ov in probes
    ]
    lines += ["", "### Samples (top-k 50, temperature 0.8, seed 0)", ""]
    for p, g in gens:
        lines += [f"- **{p}**{g.replace(chr(10), ' ')[:300]}"]
    return "\n".join(lines) + "\n"


def main() -> None:
    """Run every measurement and write the markdown section."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=Path("src/herllm/assets/herllm-tiny"))
    ap.add_argument("--out", type=Path, default=Path("docs/base_model.md"))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(args.model).float().eval()
    tok = AutoTokenizer.from_pretrained(args.model)
    ppl = perplexities(model, tok)
    probes = probe_table(model, tok)
    gens = samples(model, tok)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(args.model, ppl, probes, gens, time.time() - t0))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
