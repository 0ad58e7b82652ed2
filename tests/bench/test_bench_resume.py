"""`herllm bench --resume`: a stopped benchmark goes on from its results.json."""

import json

import pytest
from test_sweep import make_stream

from herllm.bench import runner
from herllm.bench.runner import BenchConfig, run_bench
from herllm.errors import UserError


def config(tmp_path, tiny_model_dir, **kw):
    base = dict(stream_dir=str(tmp_path / "s"), domains=["alpha", "beta"], strategies=["naive"],
                orders=1, tokens_per_domain=400, evals_per_domain=1, eval_windows=2,
                probe_items=0, instructions=0, intrinsic=False, model=str(tiny_model_dir),
                seq_len=32, batch_size=4, lr=0.01, lora_r=4, out=str(tmp_path / "out"))  # fmt: skip
    return BenchConfig(**(base | kw))


@pytest.mark.slow
def test_resume_keeps_finished_runs_and_runs_only_the_missing_ones(
    tmp_path, tiny_model_dir, monkeypatch
):
    make_stream(tmp_path / "s")
    first = run_bench(config(tmp_path, tiny_model_dir), progress=lambda m: None)
    calls = []
    real = runner.run_one

    def counting(bc, data, spec, order, k, peak, label=None):
        calls.append((spec, k))
        return real(bc, data, spec, order, k, peak, label)

    monkeypatch.setattr(runner, "run_one", counting)
    # a run that failed is run again, an ok one is kept as it was
    failed = first["runs"][0] | {"strategy": "base", "status": "failed", "reason": "x"}
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    saved["runs"].append(failed)
    (tmp_path / "out" / "results.json").write_text(json.dumps(saved))
    bc = config(tmp_path, tiny_model_dir, orders=2, strategies=["base", "naive"], resume=True)
    second = run_bench(bc, progress=lambda m: None)
    assert calls == [("base", 0), ("base", 1), ("naive", 1)]
    kept = [r for r in second["runs"] if r.get("kept_from")]
    assert len(kept) == 1 and kept[0]["strategy"] == "naive" and kept[0]["seed"] == 0
    assert kept[0]["metrics"] == first["runs"][0]["metrics"]
    assert {(r["strategy"], r["seed"]) for r in second["runs"]} == {
        ("base", 0),
        ("naive", 0),
        ("base", 1),
        ("naive", 1),
    }
    assert set(second["summary"]) == {"base", "naive"}
    assert second["summary"]["naive"]["avg_final_loss"]["n"] == 2


def test_resume_refuses_other_settings_in_one_line(tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    out.mkdir()
    old = config(tmp_path, tiny_model_dir)
    (out / "results.json").write_text(json.dumps({"config": runner.asdict(old), "runs": []}))
    with pytest.raises(UserError, match=r"other settings \(lr 0.01 -> 0.001\)") as e:
        runner.previous_runs(config(tmp_path, tiny_model_dir, lr=0.001), out / "results.json")
    assert "\n" not in str(e.value)
    (out / "results.json").write_text("{not json")
    with pytest.raises(UserError, match="not a herllm bench results file"):
        runner.previous_runs(old, out / "results.json")
