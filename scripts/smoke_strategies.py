"""Every registered strategy, a few steps each on one model, with a shift in the stream.

    python scripts/smoke_strategies.py --model smollm2-135m --out benchmarks/results/smoke_smollm2.json

Each strategy learns prose then code (two bundled domains, short windows) with shift detection
warmed up quickly, so the strategies that detect shifts close a unit (and `her`/`olora` grow an
adapter); then the run's adapters answer a prompt through `AdaptedModel`. The figures per strategy:
status, steps, shifts, adapters, loss first/last, seconds. A failure is recorded, not raised, so
one broken strategy does not hide the others.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
import traceback
from pathlib import Path

from herllm.acquire.corpus import load_documents
from herllm.bench.data import cut_to_budget
from herllm.config import build_config
from herllm.infer.adapted import AdaptedModel
from herllm.models.load import load_base
from herllm.run.learner import Learner
from herllm.strategies import STRATEGIES, strategy_overrides


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--tokens-per-domain", type=int, default=3000)
    ap.add_argument("--out", default="benchmarks/results/smoke_smollm2.json")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="herllm-smoke-"))
    _, tok = load_base(build_config(None, [f"model.name_or_path={args.model}"]).model)
    files, heldout = [], []
    for d in ("austen", "pycode"):
        docs, _ = cut_to_budget(load_documents(d, "train"), tok, args.tokens_per_domain)
        files.append(tmp / f"{d}.txt")
        files[-1].write_text("\n\x1e\n".join(docs), encoding="utf-8")
        test, _ = cut_to_budget(load_documents(d, "test"), tok, 1024)
        heldout.append(tmp / f"{d}.heldout.txt")
        heldout[-1].write_text("\n\x1e\n".join(test), encoding="utf-8")
    rows = {}
    for name in args.strategies.split(","):
        run_dir = tmp / name
        start = time.perf_counter()
        try:
            cfg = build_config(None, [
                *strategy_overrides(name), f"model.name_or_path={args.model}", f"run_dir={run_dir}",
                "stream.sources=[" + ",".join(map(str, files)) + "]", "stream.seq_len=64",
                "train.batch_size=4", "shift.warmup=12", "shift.cooldown=12",
                "expand.key_windows=8", "checkpoint.every_steps=1000000", "eval.every_steps=1000000",
                "eval.files=[" + ",".join(map(str, heldout)) + "]",
            ])  # fmt: skip
            with Learner(cfg, show_progress=False) as learner:
                summary = learner.run()
                adapters = len(learner.s.bank.adapters) if learner.s.bank is not None else 1
            first, last = summary.eval_first, summary.eval_last  # held-out NLL per eval file
            answer = AdaptedModel.from_run(run_dir, knowledge=False).generate(
                "def add(a, b):", max_new_tokens=8
            )
            rows[name] = {"status": "ok", "steps": summary.steps, "shifts": summary.shifts,
                          "adapters": adapters, "tokens_trained": summary.tokens_trained,
                          "replayed": summary.replayed, "answer": answer,
                          "heldout_before": first, "heldout_after": last,
                          "finite": all(math.isfinite(x) for x in last.values())}  # fmt: skip
        except Exception as exc:  # recorded: the next strategy still runs
            rows[name] = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}",
                          "trace": traceback.format_exc(limit=3)}  # fmt: skip
        rows[name]["seconds"] = round(time.perf_counter() - start, 1)
        print(name, json.dumps(rows[name])[:300], flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"model": args.model, "date": time.strftime("%Y-%m-%d"),
                                          "strategies": rows}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
