"""The learner beside the server: `herllm adapt --follow RUN_DIR` learns from the interaction
log through the loop and publishes a new adapter version, in PEFT's format."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import make_run
from test_log_source import add

from herllm import atomic
from herllm.serve.log import InteractionLog
from herllm.serve.versions import Versions, load_version


@pytest.mark.slow
def test_adapt_follow_learns_from_the_log_and_publishes_a_peft_version(tmp_path):
    run, _tokens = make_run(tmp_path)
    log = InteractionLog(run / "interactions.sqlite")
    for i in range(12):
        add(log, i, answer=f" The river carries stone number {i} to the sea.")
    log.feedback("chatcmpl-3", "alice", "down", None)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen([sys.executable, "-m", "herllm.cli", "adapt", "--follow", str(run),
                             "--quiet"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            steps = [s for s, _ in atomic.list_checkpoints(run / "checkpoints")]
            if steps and max(steps) > 0:
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"no new version; learner output: {proc.stdout.read().decode()[-2000:]}")
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 0, out[-2000:]
    rows = {r["id"]: r["learn"] for r in log.rows()}
    assert rows["chatcmpl-3"] == "skip" and list(rows.values()).count("train") == 11
    versions = Versions(run)
    newest = versions.available()[-1]
    assert newest != "step-0000000" and versions.current()[0] == newest
    # the adapter folder loads with PEFT's own loader and gives the served model's logits
    from peft import PeftModel

    from herllm.config import build_config
    from herllm.models.load import load_base

    step = int(newest.split("-")[1])
    served = load_version(run, step)
    base, tok = load_base(build_config(str(run / "config.yaml"), []).model)
    peft = PeftModel.from_pretrained(base, run / "checkpoints" / newest / "adapters" / "default")
    ids = tok("user: question 1\nassistant:", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a = peft.eval()(input_ids=ids).logits
        b = served.model(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-5)
    with torch.no_grad(), peft.disable_adapter():
        assert not torch.allclose(peft(input_ids=ids).logits, a, atol=1e-4)  # it learned
