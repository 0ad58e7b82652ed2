"""Tests for herllm.bench.report on a small synthetic results.json.

All figures below are TEST DATA made up for these tests (two domains "alpha" and
"beta", strategies naive + joint + a not-implemented lwf, two seeds each); they
are not measurements. Expected table values are computed here, independently of
herllm.evaluate.metrics, straight from the formulas in docs/metrics.md.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import subprocess
from pathlib import Path

import pytest

from herllm.bench.report import render_report, report_main
from herllm.errors import UserError

PLOTS = ["heatmaps", "loss_over_time", "forgetting_plasticity", "cost_vs_quality", "stability_gap"]

# Sequential runs: evaluations at steps 0, 5, 10 (the switch), 15, 20; 100 tokens per step.
NAIVE_TRACES = {
    0: [[4.0, 4.2], [2.5, 4.0], [2.0, 3.9], [2.9, 2.2], [2.6, 1.8]],
    1: [[4.2, 4.0], [2.4, 3.9], [1.9, 3.8], [3.1, 2.0], [2.9, 1.7]],
}
JOINT_FINAL = {0: [2.1, 2.0], 1: [2.0, 2.2]}
NAIVE_WALL = {0: 10.0, 1: 12.0}
JOINT_WALL = {0: 20.0, 1: 22.0}


def _cost(wall: float, contention: float) -> dict:
    return {
        "wall_seconds": wall, "tokens_trained": 2000, "tokens_scored": 800,
        "train_tokens_per_s": 2000 / wall, "peak_rss_mb": 512.0, "trainable_params": 4096,
        "added_params": 4096, "total_params": 100_000, "buffer_rows": 0, "buffer_bytes": 0,
        "flops_per_token": 6e5, "mfu": 0.01, "contention_cpu_seconds": contention,
    }  # fmt: skip


def _naive_run(seed: int) -> dict:
    losses = NAIVE_TRACES[seed]
    steps = [0, 5, 10, 15, 20]
    trace = [
        {"step": s, "tokens": s * 100, "seconds": s * 0.5, "segment": int(s > 10),
         "losses": ls, "general": 5.0 + 0.01 * s}
        for s, ls in zip(steps, losses, strict=True)
    ]  # fmt: skip
    return {
        "strategy": "naive", "seed": seed, "status": "ok", "reason": None,
        "order": ["alpha", "beta"] if seed == 0 else ["beta", "alpha"],
        "loss_matrix": [losses[0], losses[2], losses[4]], "probe_matrix": None,
        "general_loss": [5.0, 5.1, 5.2], "trace": trace, "switch_steps": [0, 10], "metrics": {},
        "cost": _cost(NAIVE_WALL[seed], contention=6.0 if seed == 1 else 0.5),
        "intrinsic": {"entropy": 3.0 + seed, "cka": [0.9, 0.8], "distinct_1": 0.5,
                      "distinct_2": 0.7, "repetition": 0.1, "gen_nll_base": 4.5},
        "routing": None,
    }  # fmt: skip


def _joint_run(seed: int) -> dict:
    base, final = [4.0, 4.2], JOINT_FINAL[seed]
    trace = [
        {"step": s, "tokens": s * 100, "seconds": s * 0.5, "segment": -1, "losses": ls,
         "general": 5.0}
        for s, ls in [(0, base), (10, [3.0, 3.0]), (20, final)]
    ]  # fmt: skip
    return {
        "strategy": "joint", "seed": seed, "order": ["alpha", "beta"], "status": "ok",
        "reason": None, "loss_matrix": [base, final, final], "probe_matrix": None,
        "general_loss": [5.0, 5.0, 5.0],
        "trace": trace, "switch_steps": [0], "metrics": {}, "cost": _cost(JOINT_WALL[seed], 0.0),
        "intrinsic": None, "routing": None,
    }  # fmt: skip


def synthetic_results() -> dict:
    """A complete results.json in the bench schema, made of test data only."""
    lwf = [
        {"strategy": "lwf", "seed": s, "order": ["alpha", "beta"], "status": "not_implemented",
         "reason": "lwf is not implemented yet (test data)"}
        for s in (0, 1)
    ]  # fmt: skip
    return {
        "herllm_version": "0.1.0", "date": "2026-11-21", "command": "herllm bench --test-data",
        "machine": {"platform": "test", "cpus": 2, "python": "3.11", "torch": "2.13.0",
                    "device": "cpu", "matmul_peak_gflops": 50.0},
        "config": {"domains": ["alpha", "beta"], "strategies": ["naive", "joint", "lwf"],
                   "seeds": [0, 1], "tokens_per_domain": 1000, "lora": {"r": 4}},
        "domains": ["alpha", "beta"],
        "runs": [_naive_run(0), _naive_run(1), _joint_run(0), _joint_run(1), *lwf],
        "summary": {},
    }  # fmt: skip


def _write(tmp: Path, data: dict | str) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    text = data if isinstance(data, str) else json.dumps(data)
    (tmp / "results.json").write_text(text, encoding="utf-8")
    return tmp


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = _write(tmp_path_factory.mktemp("bench"), synthetic_results())
    md, html = render_report(root)
    return root, md, html


def _row(md: str, strategy: str) -> list[str]:
    """Cells of the main-table row for ``strategy`` (the first table row that names it)."""
    for line in md.splitlines():
        if line.startswith(f"| {strategy} |"):
            return [c.strip() for c in line.strip("|").split("|")]
    raise AssertionError(f"no table row for {strategy}")


def _mean_std(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}"


def test_main_table_means_match_hand_computed_metrics(rendered):
    _, md_path, _ = rendered
    md = md_path.read_text()
    header = _row(md, "strategy")
    naive = dict(zip(header, _row(md, "naive"), strict=True))
    mats = {
        s: [t[0], t[2], t[4]] for s, t in NAIVE_TRACES.items()
    }  # rows: base, after d1, after d2
    avg = [sum(m[2]) / 2 for m in mats.values()]
    forget = [m[2][0] - m[1][0] for m in mats.values()]  # T = 2: only domain 1 can be forgotten
    plast = [(m[1][0] + m[2][1]) / 2 for m in mats.values()]
    bwt = [-(m[2][0] - m[1][0]) for m in mats.values()]  # -loss form
    assert naive["runs"] == "2"
    assert naive["avg final loss"] == _mean_std(avg) == "2.250 ± 0.071"
    assert naive["forgetting (loss)"] == _mean_std(forget)
    assert naive["plasticity"] == _mean_std(plast)
    assert naive["BWT"] == _mean_std(bwt)
    ppl = statistics.mean(math.exp(a) for a in avg)
    assert naive["avg final ppl"].startswith(f"{ppl:.2f} ± ")
    assert naive["general Δ"] == "0.200 ± 0.000"
    joint = dict(zip(header, _row(md, "joint"), strict=True))
    assert joint["avg final loss"] == _mean_std([sum(f) / 2 for f in JOINT_FINAL.values()])
    # A joint run sees every domain at once: no switches, so no stream metrics.
    for column in ("forgetting (loss)", "BWT", "FWT", "plasticity", "stability gap"):
        assert joint[column] == "—", column


def test_stability_gap_and_ratios(rendered):
    md = rendered[1].read_text()
    header = _row(md, "strategy")
    naive = dict(zip(header, _row(md, "naive"), strict=True))
    # After the switch at step 10 the first-trained domain goes from L_switch to its max after.
    gaps = [max(t[3][0], t[4][0]) - t[2][0] for t in NAIVE_TRACES.values()]
    assert naive["stability gap"] == _mean_std(gaps)
    naive_avg = statistics.mean(sum(t[4]) / 2 for t in NAIVE_TRACES.values())
    joint_avg = statistics.mean(sum(f) / 2 for f in JOINT_FINAL.values())
    wall = statistics.mean(JOINT_WALL.values()) / statistics.mean(NAIVE_WALL.values())
    joint_ratio_line = next(
        ln for ln in md.splitlines() if ln.startswith("| joint |") and "×" in ln
    )
    assert f"{wall:.2f}×" in joint_ratio_line
    naive_ratio_line = next(
        ln for ln in md.splitlines() if ln.startswith("| naive |") and "%" in ln
    )
    assert f"{naive_avg / joint_avg - 1:+.1%}" in naive_ratio_line


def test_not_implemented_strategy_is_listed_without_numbers(rendered):
    md = rendered[1].read_text()
    notice = [ln for ln in md.splitlines() if ln.startswith("> - lwf")]
    assert len(notice) == 1
    assert "not_implemented" in notice[0] and "lwf is not implemented yet" in notice[0]
    assert not [ln for ln in md.splitlines() if ln.startswith("| lwf")], "lwf must get no table row"
    assert "No row for: lwf" in md


def test_contention_warning_names_the_busy_run(rendered):
    md = rendered[1].read_text()
    busy = [ln for ln in md.splitlines() if "other processes used" in ln]
    assert len(busy) == 2  # the notice at the top, and again under the cost table
    assert busy[0].startswith("> - naive seed 1") and "(50%)" in busy[0]
    assert busy[1].startswith("⚠ Contention above 25%") and "naive seed 1" in busy[1]
    assert "naive seed 0" not in md  # 0.5 CPU-s in 10 s is below the threshold


def test_html_is_self_contained_and_plots_exist(rendered):
    root, _, html_path = rendered
    page = html_path.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page)
    assert page.count('<img alt="') == len(PLOTS)
    assert page.count('src="data:image/png;base64,') == len(PLOTS)
    for name in PLOTS:
        png = root / "plots" / f"{name}.png"
        assert png.is_file() and png.stat().st_size > 5_000, name
        assert f"](plots/{name}.png)" in rendered[1].read_text()


def test_recorded_metric_that_disagrees_is_flagged(tmp_path):
    data = synthetic_results()
    ppl = math.exp(sum(JOINT_FINAL[0]) / 2)  # agrees with the matrix: must not be flagged
    # joint seed 0; its forgetting is undefined (no stream), so a recorded 0.0 is not a conflict.
    data["runs"][2]["metrics"] = {
        "avg_final_loss": 9.99,
        "avg_final_ppl": ppl,
        "forgetting_loss": 0,
    }
    md_path, _ = render_report(_write(tmp_path, data))
    md = md_path.read_text()
    flagged = [ln for ln in md.splitlines() if "recorded 9.99" in ln]
    assert len(flagged) == 1 and "joint seed 0" in flagged[0] and "recomputed 2.05" in flagged[0]
    assert "avg_final_ppl recorded" not in md and "forgetting_loss recorded" not in md
    assert _row(md, "joint")[2].startswith("2.075 ± ")  # the table keeps the recomputed value


def test_switch_without_an_evaluation_is_flagged_not_fatal(tmp_path):
    data = synthetic_results()
    for run in data["runs"][:2]:  # naive: switch_steps name a step the trace never evaluated
        run["switch_steps"] = [0, 3]
        run["metrics"] = {"stability_gap": 0.25}
    md_path, html_path = render_report(_write(tmp_path, data))
    md = md_path.read_text()
    flagged = [ln for ln in md.splitlines() if "no evaluation at switch step 3" in ln]
    assert len(flagged) == 2 and all("trace figures taken as recorded" in ln for ln in flagged)
    naive = dict(zip(_row(md, "strategy"), _row(md, "naive"), strict=True))
    assert naive["stability gap"] == "0.250 ± 0.000"  # the recorded value, said so above
    assert not (tmp_path / "plots" / "stability_gap.png").exists()  # no run to draw it from
    assert (tmp_path / "plots" / "loss_over_time.png").stat().st_size > 5_000


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ('{"runs": []}', "non-empty 'runs' list"),
        ("RUN_BAD_STATUS", "status is 'done'"),
        ("RUN_BAD_SHAPE", "loss_matrix has shape (2, 2), expected (3, 2)"),
        (None, "not found"),
    ],
)
def test_malformed_results_give_one_line_user_error(tmp_path, content, message):
    data = synthetic_results()
    if content == "RUN_BAD_STATUS":
        data["runs"][1]["status"] = "done"
        content = json.dumps(data)
    elif content == "RUN_BAD_SHAPE":
        data["runs"][1]["loss_matrix"] = data["runs"][1]["loss_matrix"][:2]
        content = json.dumps(data)
    if content is not None:
        _write(tmp_path, content)
    with pytest.raises(UserError) as err:
        report_main(str(tmp_path))
    text = str(err.value)
    assert "\n" not in text and "results.json" in text and message in text


def test_report_main_rejects_a_missing_directory(tmp_path):
    with pytest.raises(UserError, match="not a directory"):
        report_main(str(tmp_path / "nope"))


CHROMIUM = "/usr/bin/chromium"


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} not installed")
def test_report_renders_in_headless_chromium(rendered, tmp_path):
    shot = tmp_path / "shot.png"
    cmd = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
        "--window-size=1200,2000", rendered[2].resolve().as_uri(),
    ]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    assert shot.is_file()
    image = pytest.importorskip("PIL.Image")
    with image.open(shot) as img:
        grey = img.convert("L")
        assert grey.size == (1200, 2000)
        hist = grey.histogram()  # 256 counts of grey levels
    total = sum(hist)
    dark = sum(hist[:128]) / total  # text, table rules and plot ink
    assert 0.005 < dark < 0.6, f"screenshot looks blank or broken ({dark:.1%} dark pixels)"
    mean = sum(i * c for i, c in enumerate(hist)) / total
    std = math.sqrt(sum(c * (i - mean) ** 2 for i, c in enumerate(hist)) / total)
    assert std > 10, f"screenshot is nearly uniform (grey-level std {std:.1f})"


def test_her_targets_say_met_or_by_how_much_they_are_missed():
    from herllm.bench.targets import target_rows

    def st(**kw):
        return {k: (v, 0.0, 3) for k, v in kw.items()}

    stats = {
        "joint": st(avg_final_loss=4.0),
        "naive": st(forgetting_loss=0.4, plasticity=4.0, general_delta=0.4, wall_seconds=10.0),
        "replay": st(forgetting_loss=0.05),
        "her": st(avg_final_loss=4.02, forgetting_loss=0.08, plasticity=4.2, general_delta=0.1,
                  wall_seconds=12.0),
    }  # fmt: skip
    rows = {r[0]: r for r in target_rows(stats)}
    assert rows["average final loss within 1% of joint"][2] == "met"  # +0.5%
    assert rows["forgetting at most 25% of naive's"][2] == "met"  # 20%
    assert rows["forgetting below replay's"][2] == "above replay by 0.03"
    assert rows["plasticity within 2% of naive"][1] == "4.2 vs 4: +5.0%"
    assert rows["plasticity within 2% of naive"][2] == "short by 3.0 percentage points"
    assert rows["general-ability delta at most 25% of naive's"][2] == "met"  # exactly 25%
    stats["her"]["general_delta"] = (0.12, 0.0, 3)
    rows_gd = {r[0]: r for r in target_rows(stats)}
    assert (
        rows_gd["general-ability delta at most 25% of naive's"][2]
        == "short by 5.0 percentage points"
    )
    stats["her"]["general_delta"] = (0.1, 0.0, 3)
    assert rows["wall-clock at most 1.3x naive"][2] == "met"  # 1.2x
    del stats["replay"]
    stats["her"]["wall_seconds"] = (20.0, 0.0, 3)
    rows = {r[0]: r for r in target_rows(stats)}
    assert "forgetting below replay's" not in rows  # no replay row: nothing to compare with
    assert rows["wall-clock at most 1.3x naive"][2] == "short by 0.70x"
    assert target_rows({"naive": stats["naive"]}) == []  # no her row at all
