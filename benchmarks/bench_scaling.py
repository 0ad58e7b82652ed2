"""The same `her` run on one process, on two under DDP, on two with the base sharded by FSDP, and
on two with the adapters' optimizer state partitioned by DeepSpeed ZeRO-2.

The stream is bundled domains cut to a token budget. Each configuration is a separate
`herllm adapt` (launched with torchrun for two processes) on the same stream with the same
global batch; we report wall time, trained tokens per second, the final held-out loss, the
base parameters each rank holds and (ZeRO) the trainable parameters whose optimizer state it holds. On a CPU machine the processes share its cores, so this measures
what the multi-process machinery costs, not a speed-up.

    python benchmarks/bench_scaling.py --out results/bench_scaling.json
    python benchmarks/bench_scaling.py --model smollm2-135m --tokens-per-domain 6000 \
        --set shift.warmup=16 --set shift.cooldown=24 --runs one,ddp,fsdp --out ...

`--model` takes any model herllm loads (a registry name, a folder, a hub id); `--set` passes
config overrides to every run (a short stream needs a shorter shift warm-up to see its shift).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from herllm.acquire.corpus import load_documents
from herllm.bench.data import cut_to_budget
from herllm.config import build_config
from herllm.models.load import load_base


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/bench_scaling.json")
    ap.add_argument("--domains", default="sotu,pycode")
    ap.add_argument("--tokens-per-domain", type=int, default=24_000)
    ap.add_argument("--batch", type=int, default=8, help="global batch (split over processes)")
    ap.add_argument("--model", default="herllm-tiny")
    ap.add_argument("--set", action="append", default=[], help="config override for every run")
    ap.add_argument("--runs", default="one,ddp,fsdp,zero2", help="which configurations to run")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="herllm-scaling-"))
    _, tok = load_base(build_config(None, [f"model.name_or_path={args.model}"]).model)
    files, held = [], []
    for d in args.domains.split(","):
        docs, _ = cut_to_budget(load_documents(d, "train"), tok, args.tokens_per_domain)
        files.append(tmp / f"{d}.txt")
        files[-1].write_text("\n\x1e\n".join(docs), encoding="utf-8")
        held.append(load_documents(d, "test")[:40])
    (tmp / "heldout.txt").write_text("\n\x1e\n".join(sum(held, [])), encoding="utf-8")
    sets = [x for o in args.set for x in ("--set", o)]
    common = ["-m", "herllm.cli", "adapt", "--quiet", *map(str, files), "--strategy", "her",
              "--model", args.model, *sets,
              "--set", f"eval.files=[{tmp / 'heldout.txt'}]", "--set", "eval.max_windows=32",
              "--set", "checkpoint.every_steps=1000000", "--set", "eval.every_steps=1000000"]  # fmt: skip
    one = [sys.executable, *common, "--batch-size", str(args.batch)]
    two = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           *common, "--batch-size", str(args.batch // 2),
           "--set", f"select.score_batch_size={16 // 2}"]  # fmt: skip
    one_thread = {"OMP_NUM_THREADS": "1"}
    configs = {
        "one": ("1 process, 2 threads", one, {"OMP_NUM_THREADS": "2"}),
        "ddp": ("2 processes, DDP", two, one_thread),
        "fsdp": ("2 processes, FSDP", two + ["--set", "train.fsdp=true"], one_thread),
        "zero2": ("2 processes, ZeRO-2", two + ["--set", "train.deepspeed=2"], one_thread),
    }
    results = {"machine": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
               "model": args.model, "overrides": args.set, "domains": args.domains,
               "tokens_per_domain": args.tokens_per_domain, "runs": {}}  # fmt: skip
    for key in args.runs.split(","):
        name, argv, extra = configs[key]
        run = tmp / name.replace(" ", "_").replace(",", "")
        t0 = time.perf_counter()
        subprocess.run([*argv, "--run-dir", str(run)], env={**os.environ, **extra}, check=True)
        wall = time.perf_counter() - t0
        ckpt = sorted((run / "checkpoints").glob("step-*"))[-1]
        state = torch.load(ckpt / "trainer.pt", weights_only=False)
        c = state["counters"]
        shares = [r.get("sharded") for r in state.get("ranks", [])]
        zero = [r.get("zero") for r in state.get("ranks", [])]
        results["runs"][name] = {
            "wall_s": round(wall, 1),
            "loop_s": round(c["train_seconds"], 1),
            "steps": state["step"],
            "tokens_trained": c["tokens_trained"],
            "train_tok_per_s": round(c["tokens_trained"] / c["train_seconds"], 1),
            "final_heldout_nll": json.loads(
                (run / "metrics.jsonl").read_text().splitlines()[-1]  # evaluated after the save
            )["eval_nll"]["heldout.txt"],
            "shifts": c["shifts"],
            "adapters": len(state["bank"]["adapters"]) if state.get("bank") else 1,
            "base_params_per_rank": [s["local_params"] for s in shares if s] or None,
            "optimizer_state_params_per_rank": [z["local_params"] for z in zero if z] or None,
        }
        print(name, results["runs"][name], flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
