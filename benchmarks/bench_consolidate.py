"""Consolidation cost: importances (EWC's Fisher, MAS) from one batched pass vs one pass per sample.

Both paths compute the same per-sample gradients of the LoRA weights (checked here); they run in
alternating rounds (A B A B ...) so machine noise hits both alike, and we report medians.

    python benchmarks/bench_consolidate.py --out results/bench_consolidate.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from herllm.config import LoraConfig, ModelConfig
from herllm.models.load import attach_lora, load_base
from herllm.update import importance as r


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="results/bench_consolidate.json")
    p.add_argument("--batches", type=int, default=4, help="batches of 8 windows (the loop's cap)")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()

    base, _tok = load_base(ModelConfig())  # the bundled herllm-tiny
    model = attach_lora(base, LoraConfig())
    torch.manual_seed(0)
    with torch.no_grad():  # a trained adapter: B = 0 (fresh) would zero every A gradient
        for n, w in model.named_parameters():
            if "lora_B" in n:
                w.normal_(0, 0.02)
    vocab = model.config.vocab_size
    batches = []
    for _ in range(args.batches):
        ids = torch.randint(0, vocab, (8, args.seq))
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    pairs = r._lora_pairs(model)
    assert pairs is not None
    result = {"machine": platform.platform(), "threads": torch.get_num_threads(),
              "windows": 8 * args.batches, "seq_len": args.seq}  # fmt: skip
    for name, objective, stat in (
        ("ewc", r._lm_loss, torch.square),
        ("mas", r._logit_sq_norm, torch.abs),
    ):
        times = {"loop": [], "batched": []}
        for _ in range(args.rounds):
            for path in ("loop", "batched"):
                t0 = time.perf_counter()
                if path == "loop":
                    slow = r._looped_per_sample_grad_mean(model, batches, objective, stat)
                else:
                    fast = r._lora_per_sample_grad_mean(model, batches, objective, stat, pairs)
                times[path].append(time.perf_counter() - t0)
        err = max(float((fast[k] - slow[k]).abs().max() / slow[k].abs().max()) for k in slow)
        loop, batched = statistics.median(times["loop"]), statistics.median(times["batched"])
        result[name] = {"loop_s": round(loop, 3), "batched_s": round(batched, 3),
                        "speedup": round(loop / batched, 2), "max_rel_diff": err}  # fmt: skip
        print(f"{name}: per-sample loop {loop:.2f} s, batched {batched:.2f} s "
              f"({loop / batched:.1f}x), max relative difference {err:.1e}")  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
