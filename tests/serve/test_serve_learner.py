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


@pytest.mark.slow
def test_serve_learn_starts_the_learner_and_swaps_to_its_version(tmp_path):
    import httpx
    import openai
    from helpers import free_port

    run, tokens = make_run(tmp_path)
    port, url = free_port(), None
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen([sys.executable, "-m", "herllm.cli", "serve", str(run), "--learn",
                             "--encoder", "none", "--port", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                httpx.get(url + "/health", timeout=2)
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        c = openai.OpenAI(base_url=url + "/v1", api_key=tokens["alice"], max_retries=0)
        for i in range(8):
            r = c.chat.completions.create(model="herllm-tiny", max_tokens=16, messages=[
                {"role": "user", "content": f"Stone {i} lies in the river bed."}])  # fmt: skip
            assert r.system_fingerprint in ("base", "step-0000000")
        while time.monotonic() < deadline:
            version = httpx.get(url + "/health").json()["version"]
            if version not in ("base", "step-0000000"):
                break
            time.sleep(0.5)
        else:
            pytest.fail("the server never swapped to a version the learner published")
        r = c.chat.completions.create(model="herllm-tiny", max_tokens=4,
                                      messages=[{"role": "user", "content": "Where?"}])  # fmt: skip
        assert r.system_fingerprint == version
        assert f"herllm-tiny@{version}" in [m.id for m in c.models.list().data]
    finally:
        proc.send_signal(signal.SIGTERM)  # the server stops its learner on the way out
        proc.wait(timeout=120)
    time.sleep(1)
    assert not learner_running(run)


def learner_running(run) -> bool:
    """Whether a `herllm adapt --follow RUN` process is alive (Linux /proc)."""
    from pathlib import Path

    for p in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = p.read_bytes().split(b"\0")
        except OSError:
            continue  # gone meanwhile
        if b"--follow" in args and str(run).encode() in args:
            return True
    return False
