"""The `hf-peft` reference row: a Trainer + PEFT script in `herllm bench`, treated as any row."""

import json
import random

import numpy as np
import pytest

from herllm.bench.hf_reference import REPLAY_SHARE, with_replay
from herllm.bench.report import run_figures
from herllm.cli import main

pytestmark = pytest.mark.slow


def test_hf_peft_row_trains_sequentially_rewarms_and_is_reported(tmp_path, capsys):
    out = tmp_path / "bench"
    argv = ["bench", "--domains", "sotu,pycode", "--strategies", "base,naive,hf-peft",
            "--tokens-per-domain", "3000", "--evals-per-domain", "2", "--eval-windows", "2",
            "--probe-items", "0", "--orders", "1", "--intrinsic", "false", "--seq-len", "64",
            "--batch-size", "4", "--out", str(out), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    runs = {r["strategy"]: r for r in results["runs"]}
    hf, naive, base = runs["hf-peft"], runs["naive"], runs["base"]
    assert hf["status"] == "ok", hf.get("reason")
    assert set(naive) <= set(hf) and hf["cost"].keys() == naive["cost"].keys()
    L = hf["loss_matrix"]
    assert L[0] == base["loss_matrix"][0]  # the same model, loaded the same way, same suite
    assert L[1][0] < base["loss_matrix"][0][0]  # learned domain 1 by the end of domain 1
    assert L[2][1] < base["loss_matrix"][0][1]
    # 25% of domain 2's windows are replaced, not added: naive's tokens within two windows
    assert abs(hf["cost"]["tokens_trained"] - naive["cost"]["tokens_trained"]) <= 2 * 64
    assert hf["cost"]["buffer_rows"] > 0 and hf["cost"]["tokens_scored"] == 0
    # one evaluation before training, two inside each domain (mid-segment pause, then its end)
    assert [p["segment"] for p in hf["trace"]] == [0, 0, 0, 1, 1]
    steps = [p["step"] for p in hf["trace"]]
    assert steps == sorted(steps) and 0 < steps[1] < steps[2] < steps[3] < steps[4]
    lr, switch = np.array(hf["lr_trace"]), hf["switch_steps"]
    assert len(lr) == steps[-1] and switch == [0, steps[2]]
    for s in switch:  # re-warmed at every segment start
        assert lr[s] < lr[s + 1] == pytest.approx(1e-3)
    assert lr[switch[1]] < lr[switch[1] - 1]  # the drop back to the start of a warm-up
    for seg in (lr[1 : switch[1]], lr[switch[1] + 1 :]):  # one cosine per segment across pauses
        assert np.all(np.diff(seg) <= 0) and seg[-1] >= 0.1 * 1e-3 - 1e-12
    # the report recomputes its figures from the row and agrees; forgetting is measured
    figures, issues = run_figures(hf)
    assert issues == [] and np.isfinite(figures["forgetting_loss"])
    assert hf["metrics"]["forgetting_loss"] is not None
    assert "forgetting_loss" in results["summary"]["hf-peft"]
    assert "| hf-peft |" in (out / "report.md").read_text()


def test_replay_replaces_a_quarter_of_the_windows_with_earlier_ones():
    rng = random.Random(0)
    new, past = list(range(100)), list(range(1000, 1040))
    mixed = with_replay(new, past, rng)
    assert len(mixed) == len(new)
    assert sum(w >= 1000 for w in mixed) == round(REPLAY_SHARE * len(new))
    assert all(w == i for i, w in enumerate(mixed) if w < 1000)  # the rest stay where they were
    assert with_replay(new, [], rng) == new  # the first segment has nothing to replay
