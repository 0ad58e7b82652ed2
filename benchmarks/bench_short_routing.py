"""Short prompts after learning: which adapter answers a question of a few words?

For each domain order (`--orders kjv,pycode austen,shakespeare`), `herllm adapt --strategy her`
learns the bundled domains back to back on herllm-tiny (`--windows` 128-token windows of each
domain's train split), then every option of `expand.fallback` routes prompts cut from each
domain's test split (`--prompts` per domain and length, about `--chars` characters), one
prompt per call as `herllm generate "prompt"` routes it. The right adapter of a domain is the
one its unit trained (unit k learned the k-th domain; the order needs exactly one detected shift
per boundary). Also reported: where the benchmark's intrinsic generation prompts go.

Options: `base (fixed radius)` is the routing before `expand.fallback` existed; `(fixed
radius)` keeps `expand.fallback_radius` as it is for every input, the others widen it for short
inputs (`herllm.update.adapters.widening`). A run already in `--work` is measured again, not
retrained.

    python benchmarks/bench_short_routing.py --out results/bench_short_routing.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from herllm.acquire.corpus import load_documents
from herllm.bench.suite import PROMPTS
from herllm.cli import main as herllm
from herllm.infer.adapted import AdaptedModel
from herllm.memory.ledger import read_ledger
from herllm.update import adapters as ad

OPTIONS = {  # name -> (expand.fallback, widen the radius for short inputs)
    "base (fixed radius)": ("base", False),
    "recent (fixed radius)": ("recent", False),
    "base": ("base", True),
    "recent": ("recent", True),
    "nearest": ("nearest", True),
}


def stream_files(root: Path, domains: list[str], windows: int, tok) -> list[str]:
    """The first documents of each domain's train split, about `windows` windows of 128."""
    files = []
    for d in domains:
        docs, n = [], 0
        for doc in load_documents(d, "train"):
            docs.append(doc)
            n += len(tok(doc, add_special_tokens=False)["input_ids"]) + 2  # + bos, eos
            if n >= windows * 128:
                break
        path = root / f"{d}.txt"
        path.write_text("\n\x1e\n".join(docs), encoding="utf-8")
        files.append(str(path))
    return files


def cut_prompts(domain: str, n: int, chars: int, seed: int) -> list[str]:
    """`n` spans of about `chars` characters from random places of the test split, as written
    (line breaks kept), starting and ending at whitespace."""
    text = "\n".join(load_documents(domain, "test"))
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        i = int(rng.integers(0, len(text) - 2 * chars))
        span = text[i : i + 2 * chars]
        start = next((k + 1 for k, c in enumerate(span) if c.isspace()), 0)
        cut = span[start : start + chars + 1]
        end = (
            max(k for k, c in enumerate(cut) if c.isspace())
            if any(c.isspace() for c in cut)
            else len(cut)
        )
        if cut[:end].strip():
            out.append(cut[:end].strip())
    return out


def route_all(m: AdaptedModel, texts: list[str], fallback: str, widen: bool) -> list[str]:
    """The adapter each text would use, one text per call (as `herllm generate` routes)."""
    m.bank.fallback = fallback
    extra = [m.open_key] if m.open_key is not None else []
    names = []
    for text in texts:
        enc = m._encode([text])
        reps = ad.base_reps(m.model, [enc]).numpy()
        tokens = enc["attention_mask"].sum(1).cpu().numpy() if widen else None
        names.append(m.bank.route(reps, extra, tokens)[0])
    return ["base" if n == ad.BASE else n for n in names]


def measure_order(domains: list[str], run: Path, args) -> dict:
    from transformers import AutoTokenizer

    from herllm.models.load import BUNDLED

    run.parent.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(BUNDLED["herllm-tiny"])
    files = stream_files(run.parent, domains, args.windows, tok)
    t0 = time.perf_counter()
    if not (run / "checkpoints").is_dir():  # a run left by an earlier call is measured again
        assert herllm(["adapt", "--strategy", "her", "--run-dir", str(run), "--quiet", *files]) == 0
    train_s = time.perf_counter() - t0
    units = [r["unit"] for r in read_ledger(run) if r["type"] == "open"]
    assert len(units) == len(domains), f"{len(units)} units for {len(domains)} domains: {units}"
    m = AdaptedModel.from_run(run)
    adapter_of = {u: a for a, info in m.bank.adapters.items() for u in info["units"]}
    if m.open_key is not None:
        adapter_of[m.open_key.unit] = m.open_key.adapter
    right = {d: adapter_of[u] for d, u in zip(domains, units, strict=True)}
    probe = cut_prompts(domains[0], 1, 50, 0)  # the path measured here is the one generate takes
    assert m.routes(probe) == route_all(m, probe, "nearest", True)
    result = {"right": right, "train_s": round(train_s, 1), "accuracy": {}, "to_base": {}}
    for chars in args.chars:
        prompts = {
            d: cut_prompts(d, args.prompts, chars, 100 * i + chars) for i, d in enumerate(domains)
        }
        for name, (fallback, widen) in OPTIONS.items():
            got = {d: route_all(m, prompts[d], fallback, widen) for d in domains}
            hits = sum(r == right[d] for d in domains for r in got[d])
            base = sum(r == "base" for d in domains for r in got[d])
            total = args.prompts * len(domains)
            result["accuracy"].setdefault(name, {})[chars] = round(hits / total, 3)
            result["to_base"].setdefault(name, {})[chars] = round(base / total, 3)
    result["intrinsic_prompts"] = {
        name: route_all(m, list(PROMPTS), *OPTIONS[name]) for name in OPTIONS
    }
    m.bank.fallback = "nearest"
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--orders", nargs="+", default=["kjv,pycode", "austen,shakespeare"])
    ap.add_argument("--windows", type=int, default=320)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--chars", type=int, nargs="+", default=[25, 50, 100, 200])
    ap.add_argument("--work", default="/tmp/bench_short_routing")
    ap.add_argument("--out", default="results/bench_short_routing.json")
    args = ap.parse_args()
    results = {}
    for order in args.orders:
        domains = order.split(",")
        results[order] = measure_order(domains, Path(args.work) / "-".join(domains) / "run", args)
        r = results[order]
        print(f"{order}: right adapters {r['right']} (learned in {r['train_s']} s)")
        print(f"  {'option':22s}" + "".join(f"{c:>5d} ch" for c in args.chars) + "   (to base)")
        for name in OPTIONS:
            acc = "".join(f"{r['accuracy'][name][c]:8.3f}" for c in args.chars)
            base = " ".join(f"{r['to_base'][name][c]:.2f}" for c in args.chars)
            print(f"  {name:22s}{acc}   ({base})")
        print(f"  intrinsic prompts {list(PROMPTS)}: {r['intrinsic_prompts']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"results": results, "args": vars(args)}, indent=1))


if __name__ == "__main__":
    main()
