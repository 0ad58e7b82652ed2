"""Update-step throughput: herllm's step vs a bare PyTorch + PEFT loop, and no-grad scoring.

Both loops train the same model with the same LoRA settings on the same batches; blocks of steps
alternate (A B A B ...) so machine noise hits both alike, and we compare medians of ratios.
Run twice by `make bench-step`: once with herllm's malloc tuning and once without, in separate
processes (the setting only takes effect at process start).

    python benchmarks/bench_step.py --out results/bench_step.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_CONFIG = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=4, vocab_size=8192, max_position_embeddings=1024)  # fmt: skip


def model_dir(tmp: Path, name: str = "herllm-tiny") -> Path:
    """`name` resolved as `--model` resolves it (a named model, a directory); for the default,
    the same architecture with random weights when the bundled model is absent."""
    from herllm.models.load import BUNDLED, resolve_model_path

    if name != "herllm-tiny":
        return Path(resolve_model_path(name))  # smollm2-135m: converted once into the cache
    if (BUNDLED["herllm-tiny"] / "config.json").is_file():
        return BUNDLED["herllm-tiny"]
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny_models import build_tiny_model

    return build_tiny_model(tmp / "model", vocab_size=8192, hidden=256, layers=4)


def make_learner(path: Path, tmp: Path, batch: int, seq: int, r: int):
    from herllm.config import build_config
    from herllm.run.learner import Learner

    (tmp / "stream.txt").write_text("bench " * 100)
    cfg = build_config(None, [f"model.name_or_path={path}", f"run_dir={tmp / 'run'}", f"stream.sources=[{tmp / 'stream.txt'}]",
                              f"train.batch_size={batch}", f"stream.seq_len={seq}", f"lora.r={r}", "train.warmup_steps=1"])  # fmt: skip
    return Learner(cfg, show_progress=False)


def make_bare(path: Path, r: int):
    """What a user writes today: HF model + PEFT LoRA + AdamW, nothing else."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = get_peft_model(
        model,
        LoraConfig(
            r=r,
            lora_alpha=2 * r,
            lora_dropout=0.0,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        ),
    )
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-4)
    return model, opt


def batches(n: int, batch: int, seq: int, vocab: int):
    import numpy as np

    from herllm.acquire.chunks import Experience

    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        exps = []
        for j in range(batch):
            ids = rng.integers(0, vocab, seq).astype(np.int32)
            ones = np.ones(seq, dtype=bool)
            exps.append(Experience(f"b{i}-{j}@0", f"b{i}-{j}", 0, i, ids, ones, ones))
        out.append(exps)
    return out


def run(args) -> dict:
    import torch

    from herllm.acquire.chunks import to_batch
    from herllm.evaluate.cost import peak_rss_mb
    from herllm.refine.scoring import score_batch

    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp(prefix="bench-step-"))
    path = model_dir(tmp, args.model)
    learner = make_learner(path, tmp, args.batch, args.seq, args.lora_r)
    bare, opt = make_bare(path, args.lora_r)
    vocab = bare.config.vocab_size
    data = batches(args.steps, args.batch, args.seq, vocab)
    tokens = args.batch * args.seq

    def bare_step(exps):
        b = to_batch(exps)
        loss = bare(**b).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in bare.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def herllm_step(exps):
        learner.update(exps, [], [])

    def score_step(exps):
        score_batch(learner.s.model, learner.s.to_device(to_batch(exps)))

    for f in (bare_step, herllm_step, score_step):  # warm-up
        for exps in data[:3]:
            f(exps)
    times = {"bare": [], "herllm": [], "score": []}
    block = args.block
    for start in range(0, args.steps, block):
        chunk = data[start : start + block]
        # Scoring runs as the learner runs it: select.score_batch_size (16) windows per pass.
        per = max(1, args.score_batch // args.batch)
        score_chunk = [sum(chunk[i : i + per], []) for i in range(0, len(chunk), per)]
        for name, f, items in (
            ("bare", bare_step, chunk),
            ("herllm", herllm_step, chunk),
            ("score", score_step, score_chunk),
        ):
            t0 = time.perf_counter()
            for exps in items:
                f(exps)
            times[name].append(len(chunk) * tokens / (time.perf_counter() - t0))
    ratios = [h / b for h, b in zip(times["herllm"], times["bare"], strict=True)]
    score_ratio = [s / h for s, h in zip(times["score"], times["herllm"], strict=True)]
    return {
        "tokens_per_s": {k: statistics.median(v) for k, v in times.items()},
        "herllm_over_bare_median": statistics.median(ratios),
        "score_over_train_median": statistics.median(score_ratio),
        "blocks": len(ratios),
        "model": str(path),
        "params": sum(p.numel() for p in bare.parameters()),
        "trainable": sum(p.numel() for p in bare.parameters() if p.requires_grad),
        "batch": args.batch,
        "seq": args.seq,
        "lora_r": args.lora_r,
        "score_batch": args.score_batch,
        "threads": torch.get_num_threads(),
        "peak_rss_mb": peak_rss_mb(),  # both loops and the scorer share this process
        "mallopt": not os.environ.get("HERLLM_NO_MALLOPT"),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="results/bench_step.json")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--block", type=int, default=5)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument(
        "--score-batch",
        type=int,
        default=16,
        help="windows per scoring pass (select.score_batch_size)",
    )
    p.add_argument("--model", default="herllm-tiny", help="a named model or a model directory")
    p.add_argument("--tuned-only", action="store_true", help="skip the run without malloc tuning")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        from herllm.cli import tune_malloc

        tune_malloc()
        print(json.dumps(run(args)))
        return
    results = {}
    variants = (("malloc_tuned", {}), ("malloc_default", {"HERLLM_NO_MALLOPT": "1"}))
    for label, extra in variants[: 1 if args.tuned_only else 2]:
        env = {**os.environ, **extra}
        env.pop("MALLOC_MMAP_MAX_", None)
        env.pop("MALLOC_TRIM_THRESHOLD_", None)
        argv = [sys.executable, __file__, "--child", "--steps", str(args.steps), "--block", str(args.block),
                "--batch", str(args.batch), "--seq", str(args.seq), "--lora-r", str(args.lora_r),
                "--score-batch", str(args.score_batch), "--model", args.model]  # fmt: skip
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, check=True)
        results[label] = json.loads(proc.stdout.strip().splitlines()[-1])
    if "malloc_default" in results:
        results["malloc_speedup_herllm"] = (
            results["malloc_tuned"]["tokens_per_s"]["herllm"]
            / results["malloc_default"]["tokens_per_s"]["herllm"]
        )
    results["machine"] = {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    results["date"] = time.strftime("%Y-%m-%d")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(render(results))


def render(r: dict) -> str:
    rows = ["| malloc | bare PEFT tok/s | herllm step tok/s | herllm / bare | scoring tok/s | scoring / train | peak RSS MB |",
            "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for label in ("malloc_tuned", "malloc_default"):
        if label not in r:
            continue
        x = r[label]
        t = x["tokens_per_s"]
        rows.append(f"| {label} | {t['bare']:,.0f} | {t['herllm']:,.0f} | {x['herllm_over_bare_median']:.3f} | "
                    f"{t['score']:,.0f} | {x['score_over_train_median']:.2f} | {x['peak_rss_mb']:,.0f} |")  # fmt: skip
    if "malloc_speedup_herllm" in r:
        rows.append(
            f"\nmalloc tuning speed-up of the herllm step: {r['malloc_speedup_herllm']:.2f}x"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    main()
