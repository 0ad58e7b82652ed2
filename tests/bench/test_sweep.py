"""The tune / test protocol: settings are chosen on tuning domains, rows run on the others."""

import json
import math
import random

import pytest

from herllm.bench import sweep
from herllm.bench.report import render_report
from herllm.bench.runner import BenchConfig, run_bench
from herllm.errors import UserError

WORDS = {
    "alpha": "river lamp ledger valley keeper window",
    "beta": "def return class self import yield",
    "gamma": "storm harbour sail rope anchor tide",
    "delta": "select from where join group order",
}


def make_stream(root):
    rng = random.Random(0)
    for name, words in WORDS.items():
        (root / name).mkdir(parents=True)
        for split, n in (("train", 40), ("test", 6)):
            docs = [" ".join(rng.choice(words.split()) for _ in range(40)) for _ in range(n)]
            (root / name / f"{split}.txt").write_text("\n\x1e\n".join(docs))
    return root


@pytest.mark.slow
def test_settings_are_chosen_on_tuning_domains_and_reported_on_the_others(
    tmp_path, tiny_model_dir, monkeypatch
):
    monkeypatch.setattr(sweep, "SWEEPS", {"replay": ("replay.ratio", (0.25, 0.5))})
    bc = BenchConfig(stream_dir=str(make_stream(tmp_path / "s")), tune_domains=["alpha", "beta"],
                     strategies=["naive", "replay", "replay:replay.mode=replace"], orders=1,
                     tokens_per_domain=800, evals_per_domain=1, eval_windows=2, probe_items=0,
                     instructions=2, instruct_tokens=8, intrinsic=False, model=str(tiny_model_dir),
                     seq_len=32, batch_size=4, lr=0.01, lora_r=4, out=str(tmp_path / "out"))  # fmt: skip
    results = run_bench(bc, progress=lambda m: None)
    s = results["sweep"]["replay"]
    assert [p["value"] for p in s["points"]] == [0.25, 0.5] and s["domains"] == ["alpha", "beta"]
    best = min(s["points"], key=lambda p: p["avg_final_loss"])
    assert s["value"] == best["value"] and all(
        math.isfinite(p["avg_final_loss"]) for p in s["points"]
    )
    assert (
        s["points"][1]["tokens_trained"] > s["points"][0]["tokens_trained"]
    )  # more replay, more tokens
    runs = {
        r["strategy"]: r
        for r in json.loads((tmp_path / "out" / "results.json").read_text())["runs"]
    }
    assert set(runs) == {"naive", "replay", "replay:replay.mode=replace"}
    for r in runs.values():  # rows run on the test domains only
        assert r["status"] == "ok", r["reason"]
        assert sorted(r["order"]) == ["delta", "gamma"]
    assert runs["replay"]["setting"] == [f"replay.ratio={s['value']}"]
    assert runs["replay:replay.mode=replace"]["setting"] == [
        f"replay.ratio={s['value']}",
        "replay.mode=replace",
    ]
    # replace mode: as many trained tokens as naive; add mode: more
    naive = runs["naive"]["cost"]["tokens_trained"]
    assert abs(runs["replay:replay.mode=replace"]["cost"]["tokens_trained"] - naive) <= 2 * 32
    assert runs["replay"]["cost"]["tokens_trained"] > 1.2 * naive
    assert runs["replay"]["metrics"]["instruct_delta"] is not None
    md, _ = render_report(tmp_path / "out")
    assert "Settings chosen on the tuning domains" in md.read_text()


def test_tuning_and_test_domains_must_not_overlap():
    bc = BenchConfig(domains=["sotu", "pycode"], tune_domains=["pycode", "kjv"])
    with pytest.raises(UserError, match="share pycode"):
        sweep.test_domains(bc)
    rest = sweep.test_domains(BenchConfig(tune_domains=["sotu", "pycode", "austen", "kjv"]))
    assert rest == ["wordnet", "pgdocs", "jargon", "shakespeare"]  # the bundled order, the rest


def test_choice_is_the_lowest_loss_and_a_failed_point_is_never_chosen():
    points = [{"value": 1, "spec": "x:a=1", "avg_final_loss": 4.2, "reasons": []},
              {"value": 2, "spec": "x:a=2", "avg_final_loss": math.nan, "reasons": ["boom"]},
              {"value": 3, "spec": "x:a=3", "avg_final_loss": 4.1, "reasons": []}]  # fmt: skip
    assert sweep.choose(points)["value"] == 3
    with pytest.raises(UserError, match="every sweep point of x failed: boom"):
        sweep.choose([points[1]])
