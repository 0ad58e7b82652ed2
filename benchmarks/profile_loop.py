"""Where a strategy's time goes: cProfile of the learner's loop over bundled domains.

    python benchmarks/profile_loop.py --strategy her --domains sotu,pycode --tokens-per-domain 24000
    python benchmarks/profile_loop.py --strategy her --set shift.reps=model

Prints the loop's phases (acquire, scoring, update, unit closes, ...) by cumulative time. Use
the ratios, not the seconds: cProfile slows Python-heavy code more than the matmuls.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import tempfile
from pathlib import Path

from herllm.acquire.corpus import load_documents
from herllm.bench.data import cut_to_budget
from herllm.config import build_config
from herllm.models.load import load_base
from herllm.run.learner import Learner
from herllm.strategies import strategy_overrides


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--strategy", default="her")
    ap.add_argument("--domains", default="sotu,pycode")
    ap.add_argument("--tokens-per-domain", type=int, default=24_000)
    ap.add_argument("--lines", type=int, default=30)
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="a config override after the strategy's (repeatable)")  # fmt: skip
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="herllm-profile-"))
    cfg0 = build_config(None, [])
    _, tok = load_base(cfg0.model)
    files = []
    for d in args.domains.split(","):
        docs, _ = cut_to_budget(load_documents(d, "train"), tok, args.tokens_per_domain)
        files.append(tmp / f"{d}.txt")
        files[-1].write_text("\n\x1e\n".join(docs), encoding="utf-8")
    cfg = build_config(None, [
        *strategy_overrides(args.strategy), f"run_dir={tmp / 'run'}",
        "stream.sources=[" + ",".join(map(str, files)) + "]", "train.lr=0.001", "lora.r=16",
        "lora.alpha=32", "checkpoint.every_steps=1000000", "eval.every_steps=1000000",
        "replay.capacity=20000", "shift.warmup=64", "shift.cooldown=120", *args.set,
    ])  # fmt: skip
    with Learner(cfg, show_progress=False) as learner:
        prof = cProfile.Profile()
        prof.enable()
        summary = learner.run()
        prof.disable()
    print(f"{args.strategy}: {summary.steps} steps, {summary.shifts} shifts, "
          f"{summary.windows_read} windows read, {summary.tokens_trained} tokens trained")  # fmt: skip
    stats = pstats.Stats(prof).sort_stats("cumulative")
    stats.print_stats(r"herllm/", args.lines)


if __name__ == "__main__":
    main()
