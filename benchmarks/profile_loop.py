"""Where a strategy's time goes: cProfile of the learner's loop over bundled domains.

    python benchmarks/profile_loop.py --strategy her --domains sotu,pycode --tokens-per-domain 24000
    python benchmarks/profile_loop.py --strategy her --set shift.reps=model
    python benchmarks/profile_loop.py --strategy her naive --timer --repeat 2

Prints the loop's phases (acquire, scoring, update, unit closes, ...) by cumulative time. Use
the ratios, not the seconds: cProfile slows Python-heavy code more than the matmuls. With
`--timer` there is no profiler: each phase is timed by the clock (its seconds are wall-clock),
and several strategies run one after another, `--repeat` times in turn, so their ratios are
measured side by side on the same machine state.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from herllm.acquire.corpus import load_documents
from herllm.bench.data import cut_to_budget
from herllm.config import build_config
from herllm.models.load import load_base
from herllm.run import learner as learner_module
from herllm.run import units as units_module
from herllm.run.learner import Learner
from herllm.run.state import RunState
from herllm.strategies import split_spec, strategy_overrides
from herllm.update.protection import Protection


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--strategy", nargs="+", default=["her"],
                    help="one or more strategies; NAME or NAME:section.key=value[:...]")  # fmt: skip
    ap.add_argument("--domains", default="sotu,pycode")
    ap.add_argument("--tokens-per-domain", type=int, default=24_000)
    ap.add_argument("--lines", type=int, default=30)
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="a config override after the strategy's (repeatable)")  # fmt: skip
    ap.add_argument("--timer", action="store_true",
                    help="time the phases by the clock instead of cProfile")  # fmt: skip
    ap.add_argument(
        "--repeat", type=int, default=1, help="with --timer: rounds over the strategies"
    )
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="herllm-profile-"))
    cfg0 = build_config(None, [])
    _, tok = load_base(cfg0.model)
    files = []
    for d in args.domains.split(","):
        docs, _ = cut_to_budget(load_documents(d, "train"), tok, args.tokens_per_domain)
        files.append(tmp / f"{d}.txt")
        files[-1].write_text("\n\x1e\n".join(docs), encoding="utf-8")
    if not args.timer:
        for spec in args.strategy:
            profile(spec, tmp, files, args)
        return
    rows = defaultdict(list)
    for r in range(args.repeat):
        for i, spec in enumerate(args.strategy):
            rows[spec].append(timed(spec, tmp / f"run-{r}-{i}", files, args.set))
    first = args.strategy[0]
    base = sum(t["loop"] for t in rows[first]) / len(rows[first])
    phases = sorted({p for ts in rows.values() for t in ts for p in t})
    print(f"seconds, mean of {args.repeat} round(s); ratio = loop / {first}'s loop")
    print("strategy | ratio | " + " | ".join(phases))
    for spec, ts in rows.items():
        mean = {p: sum(t.get(p, 0.0) for t in ts) / len(ts) for p in phases}
        print(f"{spec} | {mean['loop'] / base:.2f}x | "
              + " | ".join(f"{mean[p]:.2f}" for p in phases))  # fmt: skip


def make_config(spec: str, run: Path, files: list[Path], sets: list[str]):
    name, extra = split_spec(spec)
    return build_config(None, [
        *strategy_overrides(name), *extra, f"run_dir={run}",
        "stream.sources=[" + ",".join(map(str, files)) + "]", "train.lr=0.001", "lora.r=16",
        "lora.alpha=32", "checkpoint.every_steps=1000000", "eval.every_steps=1000000",
        "replay.capacity=20000", "shift.warmup=64", "shift.cooldown=120", *sets,
    ])  # fmt: skip


def profile(spec: str, tmp: Path, files: list[Path], args) -> None:
    cfg = make_config(spec, tmp / "run", files, args.set)
    with Learner(cfg, show_progress=False) as learner:
        prof = cProfile.Profile()
        prof.enable()
        summary = learner.run()
        prof.disable()
    print(f"{spec}: {summary.steps} steps, {summary.shifts} shifts, "
          f"{summary.windows_read} windows read, {summary.tokens_trained} tokens trained")  # fmt: skip
    stats = pstats.Stats(prof).sort_stats("cumulative")
    stats.print_stats(r"herllm/", args.lines)


PHASES = {  # the loop's phases that `--timer` times (nested ones are inside their caller's)
    "update": (Learner, "update"),
    "scoring": (Learner, "score"),
    "digest": (Learner, "digest"),
    "close": (learner_module, "close_unit"),
    "stabilize": (Learner, "stabilize"),
    # inside an update
    "update.step_scores": (learner_module, "step_scores"),
    "update.track_losses": (Learner, "track_losses"),
    "update.penalties": (Learner, "objective"),
    # inside a close (and `units.mean_nll` inside stabilize's forgetting signal too)
    "close.importance": (Protection, "consolidate"),
    "close.key": (RunState, "unit_key"),
    "close.adapter": (units_module, "choose_adapter"),
    "close.snapshot": (units_module, "save_unit_snapshot"),
    "units.mean_nll": (units_module, "mean_nll"),
}


def timed(spec: str, run: Path, files: list[Path], sets: list[str]) -> dict[str, float]:
    """One run of `spec` with its phases timed by the clock; seconds per phase and `loop`."""
    seconds: dict[str, float] = defaultdict(float)
    saved = {}
    for phase, (owner, name) in PHASES.items():
        fn = saved[phase] = getattr(owner, name)

        def clocked(*a, _fn=fn, _phase=phase, **k):
            start = time.perf_counter()
            try:
                return _fn(*a, **k)
            finally:
                seconds[_phase] += time.perf_counter() - start

        setattr(owner, name, clocked)
    try:
        with Learner(make_config(spec, run, files, sets), show_progress=False) as learner:
            start = time.perf_counter()
            summary = learner.run()
            seconds["loop"] = time.perf_counter() - start
    finally:
        for phase, (owner, name) in PHASES.items():
            setattr(owner, name, saved[phase])
    seconds["tokens_trained"] = summary.tokens_trained
    seconds["shifts"] = summary.shifts
    print(f"{spec}: {summary.steps} steps, loop {seconds['loop']:.1f} s", flush=True)
    return dict(seconds)


if __name__ == "__main__":
    main()
