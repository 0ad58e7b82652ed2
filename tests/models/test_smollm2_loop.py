"""The loop on the real smollm2-135m (49,152-token vocabulary, 30 layers): a short `her` run over
a stream that shifts from prose to code grows an adapter, and a copy killed with SIGKILL after
its first checkpoint resumes to the same adapters, counters and cursor as the uninterrupted run."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from model_fakes import real_model_marks
from safetensors.torch import load_file

from herllm.atomic import list_checkpoints
from herllm.models import registry

ENTRY = registry.get_model("smollm2-135m")
pytestmark = real_model_marks()


def make_stream(root: Path) -> Path:
    """Prose, then Python: two regions a real model tells apart at once."""
    rng = random.Random(0)
    words = "the river carries what the mountain gives and the valley listens to the rain".split()
    prose = [" ".join(rng.choice(words) for _ in range(70)).capitalize() + "." for _ in range(60)]
    code = [
        f"def f{i}(items):\n    total = 0\n    for x in items:\n        if x % {i + 2} == 0:\n"
        f"            total += x * {i}\n    return total\n\n\nclass Stack{i}:\n"
        "    def __init__(self):\n        self.items = []\n\n    def push(self, x):\n"
        "        self.items.append(x)\n"
        for i in range(60)
    ]
    src = root / "stream"
    src.mkdir()
    (src / "1-prose.txt").write_text("\n\x1e\n".join(prose))
    (src / "2-code.txt").write_text("\n\x1e\n".join(code))
    return src


def argv(run: Path, src: Path | None, resume: bool = False) -> list[str]:
    base = [sys.executable, "-m", "herllm.cli", "adapt", "--quiet"]
    if resume:
        return [*base, "--resume", str(run)]
    return [*base, str(src), "--model", "smollm2-135m", "--strategy", "her", "--run-dir", str(run),
            "--seq-len", "64", "--batch-size", "4", "--set", "select.score_batch_size=8",
            "--set", "shift.warmup=16", "--set", "shift.cooldown=24", "--set", "expand.key_windows=8",
            "--set", "replay.general_windows=16", "--set", "checkpoint.every_steps=4",
            "--set", "eval.every_steps=1000"]  # fmt: skip


def final(run: Path) -> dict:
    step, ckpt = list_checkpoints(run / "checkpoints")[-1]
    trainer = torch.load(ckpt / "trainer.pt", weights_only=False)
    return {
        "step": step,
        "weights": {
            f"{f.parent.name}/{k}": v
            for f in sorted((ckpt / "adapters").glob("*/adapter_model.safetensors"))
            for k, v in load_file(str(f)).items()
        },
        "counters": {k: v for k, v in trainer["counters"].items() if k != "train_seconds"},
        "bank": trainer["bank"],
        "cursor": (ckpt / "cursor.json").read_text(),
    }


def test_her_on_smollm2_grows_an_adapter_and_resumes_exactly_after_sigkill(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    src = make_stream(tmp_path)
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    subprocess.run(argv(ref, src), env=env, check=True, timeout=1200)
    reference = final(ref)
    assert reference["counters"]["shifts"] >= 1
    assert len(reference["bank"]["adapters"]) >= 2, reference["bank"]["adapters"]  # it grew

    proc = subprocess.Popen(argv(killed, src), env=env)
    while proc.poll() is None and not list_checkpoints(killed / "checkpoints"):
        time.sleep(0.2)
    time.sleep(2.0)  # somewhere after the first checkpoint
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed_from = list_checkpoints(killed / "checkpoints")[-1][0]
    assert 0 < resumed_from < reference["step"]
    subprocess.run(argv(killed, None, resume=True), env=env, check=True, timeout=1200)
    got = final(killed)
    assert got["step"] == reference["step"] and got["cursor"] == reference["cursor"]
    assert got["counters"] == reference["counters"]
    assert got["weights"].keys() == reference["weights"].keys()
    for name, w in reference["weights"].items():
        assert torch.allclose(got["weights"][name], w, atol=1e-6, rtol=0), name
