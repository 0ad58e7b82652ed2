"""Kill a run with SIGKILL at random points, resume it each time, and compare with a run that was
never interrupted: the same windows consumed (nothing lost, nothing learned twice), the same
replay buffer, and the same final adapter weights within 1e-6."""

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from herllm.atomic import list_checkpoints

pytestmark = pytest.mark.slow


def make_stream(root: Path) -> Path:
    src = root / "stream"
    src.mkdir()
    rng = random.Random(0)
    words = "river lamp ledger valley keeper window rain stone bread salt wind".split()
    for f in range(3):
        docs = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 60))) for _ in range(40)]
        (src / f"part{f}.txt").write_text("\n\x1e\n".join(docs))
    return src


def cmd(run: Path, src: Path | None, model: Path, resume: bool) -> list[str]:
    base = [sys.executable, "-m", "herllm.cli", "adapt", "--quiet"]
    if resume:
        return [*base, "--resume", str(run)]
    return [*base, str(src), "--model", str(model), "--run-dir", str(run), "--seq-len", "32",
            "--batch-size", "4", "--replay-ratio", "0.25", "--replay-policy", "priority",
            "--select", "uncertain", "--set", "select.warmup=8", "--set", "select.fraction=0.75", "--set", "checkpoint.every_steps=2",
            "--set", "eval.every_steps=1000", "--set", "replay.capacity=10000"]  # fmt: skip


def timed_training_span(argv: list[str], run: Path, env: dict) -> tuple[float, float]:
    """Run to completion; return (start-up seconds until the first metrics line, seconds from
    there to the final checkpoint)."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, env=env)
    while proc.poll() is None and not (run / "metrics.jsonl").exists():
        time.sleep(0.02)
    t0 = time.perf_counter()
    last, newest = t0, None
    while proc.poll() is None:
        ckpts = list_checkpoints(run / "checkpoints")
        if ckpts and ckpts[-1][0] != newest:  # a new checkpoint appeared: training reached it
            newest, last = ckpts[-1][0], time.perf_counter()
        time.sleep(0.02)
    assert proc.returncode == 0
    return t0 - start, max(last - t0, 0.5)


def final_state(run: Path) -> dict:
    step, ckpt = list_checkpoints(run / "checkpoints")[-1]
    weights = load_file(str(ckpt / "adapters" / "default" / "adapter_model.safetensors"))
    trainer = torch.load(ckpt / "trainer.pt", weights_only=False)
    with sqlite3.connect(run / "replay.sqlite") as db:
        rows = sorted(db.execute("SELECT doc_id, offset, times_replayed, last_score FROM rows"))
    keys = ("windows_read", "tokens_streamed", "tokens_trained", "selected", "replayed")
    return {
        "step": step,
        "weights": weights,
        "counters": {k: trainer["counters"][k] for k in keys},
        "rows": rows,
        "cursor": (ckpt / "cursor.json").read_text(),
    }


def test_sigkill_at_random_points_then_resume_matches_uninterrupted(tmp_path, tiny_model_dir):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    src = make_stream(tmp_path)
    ref_run, run = tmp_path / "ref", tmp_path / "killed"
    startup, span = timed_training_span(cmd(ref_run, src, tiny_model_dir, False), ref_run, env)
    reference = final_state(ref_run)
    assert reference["step"] > 10

    rng = random.Random(1234)
    kills, resumed_from = 0, []
    for attempt in range(12):
        proc = subprocess.Popen(cmd(run, src, tiny_model_dir, resume=attempt > 0), env=env)
        if attempt == 0:
            while proc.poll() is None and not (run / "metrics.jsonl").exists():
                time.sleep(0.02)  # start-up (imports) is not interesting to kill
        else:
            time.sleep(startup)  # a resumed run has its metrics file already: wait out start-up
        time.sleep(rng.uniform(0.05, 0.5) * span)  # inside the training (early enough that a
        # run faster than the timed reference is not already past its last checkpoint)
        if proc.poll() is not None:
            assert proc.returncode == 0
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        done = list_checkpoints(run / "checkpoints")
        resumed_from.append(done[-1][0] if done else 0)
        if kills == 3:  # enough kills: let the last resume finish
            subprocess.run(
                cmd(run, None, tiny_model_dir, resume=True), env=env, check=True, timeout=600
            )
            break
    assert kills >= 1, "the run finished before any kill; make the stream longer"
    assert any(0 < s < reference["step"] for s in resumed_from), resumed_from

    assert_same(final_state(run), reference)

    # A deterministic stop between checkpoints (selected windows still pending) and resume.
    stopped = tmp_path / "stopped"
    subprocess.run(
        [*cmd(stopped, src, tiny_model_dir, False), "--max-steps", "5"], env=env, check=True
    )
    assert torch.load(
        list_checkpoints(stopped / "checkpoints")[-1][1] / "trainer.pt", weights_only=False
    )["pending"]
    subprocess.run(
        [*cmd(stopped, None, tiny_model_dir, True), "--max-steps", "0"], env=env, check=True
    )
    assert_same(final_state(stopped), reference)


def assert_same(result: dict, reference: dict) -> None:
    assert result["step"] == reference["step"]
    assert result["counters"] == reference["counters"]
    assert result["cursor"] == reference["cursor"]
    assert [r[:3] for r in result["rows"]] == [r[:3] for r in reference["rows"]]
    for a, b in zip(result["rows"], reference["rows"], strict=True):
        assert abs(a[3] - b[3]) < 1e-5
    assert result["weights"].keys() == reference["weights"].keys()
    for name, w in reference["weights"].items():
        assert torch.allclose(result["weights"][name], w, atol=1e-6, rtol=0), name
