"""Task-free shift detection on the bundled stream: delay, misses and false alarms.

The domains are streamed back to back (each cut to the same token budget) through the learner
with a strategy that detects shifts; the learner is never told where a domain ends. Afterwards
the detected events (from the run's ledger) are matched to the true boundaries (known here only):

- an event belongs to the segment in which it was confirmed; the first event in segment i > 0
  detects boundary i, with delay = confirmed sample index - first sample of domain i;
- a boundary with no event before the next boundary is a miss;
- every other event is a false alarm (reported per 10k samples and the most in one domain).

    python benchmarks/bench_shift.py --orders 3 --tokens-per-domain 48000 --out results/bench_shift.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def run_order(args, data, order: list[str], k: int) -> dict:
    from herllm.config import build_config
    from herllm.evaluate.detection import match_events
    from herllm.memory.ledger import read_ledger
    from herllm.run.learner import Learner
    from herllm.strategies import strategy_overrides

    run = Path(args.out).with_suffix("") / f"{args.strategy}-order{k}"
    import shutil

    shutil.rmtree(run, ignore_errors=True)
    files = [data.train_files[d] for d in order]
    cfg = build_config(None, [*strategy_overrides(args.strategy), f"model.name_or_path={args.model}",
                              f"run_dir={run}", "stream.sources=[" + ",".join(map(str, files)) + "]",
                              f"train.lr={args.lr}", f"train.seed={k}", "checkpoint.every_steps=1000000", *args.set])  # fmt: skip
    t0 = time.perf_counter()
    with Learner(cfg, show_progress=False) as learner:
        summary = learner.run()
    seq = cfg.stream.seq_len
    bounds = np.cumsum([data.tokens[f] for f in files])[:-1]
    boundaries = [int(b // seq) for b in bounds]  # windows are packed across files
    events = [r["event"] for r in read_ledger(run) if r["type"] == "open" and r["event"]]
    result = match_events(boundaries, [e["confirmed_index"] for e in events], summary.windows_read)
    return {"order": order, "samples": summary.windows_read, "boundaries": boundaries,
            "events": events, "seconds": time.perf_counter() - t0, **result}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--orders", type=int, default=3)
    p.add_argument("--tokens-per-domain", type=int, default=48_000)
    p.add_argument("--strategy", default="her")
    p.add_argument("--model", default="herllm-tiny")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--out", default="results/bench_shift.json")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="config override"
    )
    args = p.parse_args()
    from herllm.bench.data import load_bench_data
    from herllm.bench.runner import BenchConfig, domain_orders
    from herllm.cli import tune_malloc

    tune_malloc()
    bc = BenchConfig(tokens_per_domain=args.tokens_per_domain, model=args.model, probe_items=0)
    out = Path(args.out)
    data = load_bench_data(bc, out.with_suffix("") / "data")
    runs = [
        run_order(args, data, order, k)
        for k, order in enumerate(domain_orders(data.domains, args.orders, 0))
    ]
    delays = [d for r in runs for d in r["delays"]]
    summary = {
        "boundaries": sum(len(r["boundaries"]) for r in runs), "detected": len(delays),
        "misses": sum(r["misses"] for r in runs), "delay_median": float(np.median(delays)) if delays else None,
        "delay_max": max(delays) if delays else None,
        "false_alarms_per_10k": float(np.mean([r["false_alarms_per_10k"] for r in runs])),
        "max_false_alarms_in_a_domain": max(max(r["false_alarms_per_domain"]) for r in runs),
    }  # fmt: skip
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "args": vars(args),
        "summary": summary,
        "runs": runs,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(summary, indent=1))
    for r in runs:
        print(
            " -> ".join(r["order"]),
            "delays",
            r["delays"],
            "misses",
            r["misses"],
            "FA/domain",
            r["false_alarms_per_domain"],
        )


if __name__ == "__main__":
    main()
