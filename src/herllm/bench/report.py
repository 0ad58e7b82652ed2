"""Render a bench ``results.json`` into ``report.md`` and a self-contained ``report.html``.

Quality figures are recomputed from each run's matrices and trace with
:mod:`herllm.evaluate.metrics`, so the report never trusts a number it can check;
where the recorded ``metrics`` disagree, the report says so. Runs whose status is
not ``ok`` get no row and no point in any figure: they are listed, with their
reason, in a notice at the top. The report is built once as a list of blocks and
written twice (Markdown with PNG links, HTML with the PNGs inlined as base64).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from herllm.bench import plots as P
from herllm.bench.targets import baseline_plasticity_rows, target_rows
from herllm.errors import UserError
from herllm.evaluate import metrics as M
from herllm.strategies import strategy_order

# fmt: off
STATUSES = ("ok", "not_implemented", "failed")
CONTENTION_WARN = 0.25  # other processes' CPU-seconds per wall-second: a quarter core skews timings
NAN = float("nan")
STREAM_KEYS = ["forgetting_loss", "plasticity", "bwt_loss", "fwt_loss", "stability_gap",
               "adapt_tokens_mean", "adapt_seconds_mean", "forgetting_acc", "bwt_acc"]
Block = P.Block

# (key, column label, format spec); BWT/FWT are the -loss form: BWT < 0 is forgetting.
MAIN_COLUMNS = [
    ("avg_final_loss", "avg final loss", ".3f"), ("avg_final_ppl", "avg final ppl", ".2f"),
    ("forgetting_loss", "forgetting (loss)", ".3f"), ("bwt_loss", "BWT", ".3f"),
    ("fwt_loss", "FWT", ".3f"), ("plasticity", "plasticity", ".3f"),
    ("general_delta", "general Δ", ".3f"), ("instruct_delta", "instruction Δ", ".3f"),
    ("stability_gap", "stability gap", ".3f"), ("tokens_trained", "tokens trained", ",.0f"),
    ("adapt_tokens_mean", "adapt tokens", ",.0f"), ("wall_seconds", "wall s", ".1f"),
    ("train_tokens_per_s", "train tok/s", ",.0f"), ("peak_rss_mb", "peak RSS MB", ",.0f"),
    ("trainable_params", "trainable params", ",.0f"), ("added_params", "added params", ",.0f"),
]
COST_COLUMNS = [
    ("wall_seconds", "wall s", ".1f"), ("tokens_trained", "tokens trained", ",.0f"),
    ("tokens_streamed", "tokens streamed", ",.0f"), ("replaced_by_replay", "windows replaced by replay", ",.0f"),
    ("tokens_scored", "tokens scored", ",.0f"), ("train_tokens_per_s", "train tok/s", ",.0f"),
    ("peak_rss_mb", "peak RSS MB", ",.0f"), ("total_params", "total params", ",.0f"),
    ("adapters", "adapters", ".0f"), ("adapters_grown", "adapters grown", ".0f"),
    ("buffer_rows", "buffer rows", ",.0f"), ("buffer_mb", "buffer MB", ".2f"),
    ("flops_per_token", "FLOPs/token", ".3g"), ("mfu", "MFU", ".2%"),
    ("contention_cpu_seconds", "contention CPU s", ".1f"),
    ("contention_share", "contention / wall", ".0%"),
]
PROBE_COLUMNS = [
    ("probe_final_acc", "final probe acc", ".3f"), ("forgetting_acc", "forgetting (acc)", ".3f"),
    ("bwt_acc", "BWT (acc)", ".3f"),
]
INTRINSIC_COLUMNS = [
    ("entropy", "token entropy", ".3f"), ("cka_mean", "CKA mean", ".3f"),
    ("cka_min", "CKA min layer", ".3f"), ("distinct_1", "distinct-1", ".3f"),
    ("distinct_2", "distinct-2", ".3f"), ("repetition", "repetition", ".3f"),
    ("gen_nll_base", "sample NLL (base)", ".3f"),
]
# (key, reference strategy, label, percent): ratio of means; percent shows (x / ref - 1).
RATIOS = [
    ("forgetting_loss", "naive", "forgetting / naive", False),
    ("plasticity", "naive", "plasticity / naive", False),
    ("wall_seconds", "naive", "wall / naive", False),
    ("peak_rss_mb", "naive", "RSS / naive", False),
    ("avg_final_loss", "naive", "avg loss vs naive", True),
    ("avg_final_loss", "joint", "avg loss vs joint", True),
]
# fmt: on


# ---------------------------------------------------------------- loading and validation


def load_results(path: Path) -> dict[str, Any]:
    """Read and check ``results.json``; a problem raises a one-line :class:`UserError`."""
    if not path.is_file():
        raise UserError(
            f"{path}: not found; pass the directory `herllm bench` wrote its results to"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc}); re-run `herllm bench`") from None
    if not isinstance(data, dict) or not isinstance(data.get("runs"), list) or not data["runs"]:
        raise UserError(f"{path}: expected a JSON object with a non-empty 'runs' list")
    if not isinstance(data.get("domains", []), list):
        raise UserError(f"{path}: 'domains' must be a list of domain names")
    for i, run in enumerate(data["runs"]):
        problem = _run_problem(run)
        if problem:
            who = (
                f" ({run.get('strategy')}, seed {run.get('seed')})" if isinstance(run, dict) else ""
            )
            raise UserError(f"{path}: runs[{i}]{who}: {problem}")
    return data


def _run_problem(run: Any) -> str | None:
    """What is wrong with one run entry, or None."""
    if not isinstance(run, dict) or not isinstance(run.get("strategy"), str):
        return "expected an object with a 'strategy' name"
    if run.get("status") not in STATUSES:
        return f"status is {run.get('status')!r}; expected one of {', '.join(STATUSES)}"
    if run["status"] != "ok":
        return None
    order = run.get("order")
    if not isinstance(order, list) or not order:
        return "'order' must list the domains in the order they were streamed"
    t = len(order)
    try:
        shape = np.asarray(run.get("loss_matrix"), dtype=np.float64).shape
        general = run.get("general_loss")
        g_shape = None if general is None else np.asarray(general, dtype=np.float64).shape
    except (TypeError, ValueError):
        return "loss_matrix and general_loss must hold only numbers"
    if shape != (t + 1, t):
        return f"loss_matrix has shape {shape}, expected {(t + 1, t)} for {t} domains in 'order'"
    if g_shape not in (None, (t + 1,)):
        return f"general_loss has shape {g_shape}, expected {(t + 1,)}"
    trace = run.get("trace") or []
    points_ok = isinstance(trace, list) and all(
        isinstance(p, dict) and {"step", "tokens", "losses"} <= p.keys() and len(p["losses"]) == t
        for p in trace
    )
    if not points_ok:
        return f"every trace point needs 'step', 'tokens' and {t} 'losses'"
    if any(not isinstance(run.get(k) or {}, dict) for k in ("cost", "metrics", "intrinsic")):
        return "'cost', 'metrics' and 'intrinsic' must be objects"
    return None


# ---------------------------------------------------------------- per-run figures


def _num(v: Any) -> float:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else NAN


def _mean(a: np.ndarray) -> float:
    finite = a[np.isfinite(a)]
    return float(finite.mean()) if finite.size else NAN


def _close(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)


def _trace_figures(run: dict[str, Any]) -> dict[str, float]:
    """Stability gap and adaptation speed from a sequential run's trace; NaN otherwise."""
    if not P.is_sequential(run):
        return {"stability_gap": NAN, "adapt_tokens_mean": NAN, "adapt_seconds_mean": NAN}
    steps, tokens, seconds, losses = P.trace_arrays(run)
    switches = run["switch_steps"][1:]
    speed = M.adaptation_speed(steps, losses, switches, tokens, seconds)
    return {
        "stability_gap": M.stability_gap(steps, losses, switches).mean,
        "adapt_tokens_mean": _mean(speed.tokens),
        "adapt_seconds_mean": _mean(speed.seconds),
    }


def run_figures(run: dict[str, Any]) -> tuple[dict[str, float], list[str]]:
    """Flat numbers for one ok run, and the recorded metrics that disagree with them."""
    loss = np.asarray(run["loss_matrix"], dtype=np.float64)  # (T+1, T)
    s = M.loss_matrix_summary(loss)
    out = {"avg_final_loss": s["avg_final_loss"], "avg_final_ppl": s["avg_perplexity"]}
    if run.get("general_loss") is not None:
        out["general_delta"] = M.general_ability_delta(run["general_loss"])
    if run.get("instruct_loss") is not None:
        out["instruct_delta"] = M.general_ability_delta(run["instruct_loss"])
    # Joint sees every domain at once and base never trains: neither has a stream to measure,
    # so forgetting, transfer, plasticity, stability gap and adaptation are left undefined.
    streamed = P.is_streamed(run) and run["strategy"] != "base"
    issues = []
    if streamed:
        out |= {"forgetting_loss": s["forgetting_loss"], "plasticity": s["plasticity"]}
        out |= {"bwt_loss": s["bwt_neg_loss"], "fwt_loss": s["fwt_neg_loss"]}
        try:
            out |= _trace_figures(run)
        except ValueError as exc:  # an unusable trace: fall back to what the bench recorded
            issues.append(f"trace unusable ({exc}); trace figures taken as recorded")
    if run.get("probe_matrix") is not None:
        probe = np.asarray(run["probe_matrix"], dtype=np.float64)
        out["probe_final_acc"] = M.average_accuracy(probe)
        if streamed:
            out |= {"forgetting_acc": M.forgetting(probe), "bwt_acc": M.backward_transfer(probe)}
    blank = {} if streamed else dict.fromkeys(STREAM_KEYS, NAN)
    recorded = {k: _num(v) for k, v in (run.get("metrics") or {}).items()}
    issues += [
        f"{k} recorded {recorded[k]:.6g}, recomputed {v:.6g}"
        for k, v in out.items()
        if k in recorded and not _close(recorded[k], v)
    ]
    out = recorded | out | blank
    out |= {k: _num(v) for k, v in (run.get("cost") or {}).items()}
    out["buffer_mb"] = out.get("buffer_bytes", NAN) / 1e6
    wall = out.get("wall_seconds", NAN)
    out["contention_share"] = out.get("contention_cpu_seconds", NAN) / wall if wall > 0 else NAN
    out |= _intrinsic_routing(run)
    return out, issues


def _intrinsic_routing(run: dict[str, Any]) -> dict[str, float]:
    out = {}
    intrinsic = run.get("intrinsic") or {}
    out |= {k: _num(v) for k, v in intrinsic.items() if k != "cka"}
    cka = np.asarray(intrinsic.get("cka") or [NAN], dtype=np.float64)  # (layers,)
    out |= {"cka_mean": float(cka.mean()), "cka_min": float(cka.min())}
    routing = run.get("routing")
    if routing:
        conf = routing.get("confusion")
        out["routing_accuracy"] = (
            M.routing_accuracy(conf) if conf else _num(routing.get("accuracy"))
        )
        out["oracle_gap"] = _num(routing.get("oracle_gap"))
    return out


def _stat(values: list[float]) -> P.Stat:
    """Mean and sample std (ddof=1) over runs; any undefined run makes the mean undefined."""
    a = np.asarray(values, dtype=np.float64)
    if not a.size or not np.isfinite(a).all():
        return NAN, NAN, int(np.isfinite(a).sum())
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else NAN, int(a.size)


def aggregate(per_run: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, P.Stat]]:
    """``{strategy: {key: (mean, std, n)}}`` over each strategy's ok runs."""
    stats = {}
    for name, rows in per_run.items():
        keys = {k for r in rows for k in r}
        stats[name] = {k: _stat([r.get(k, NAN) for r in rows]) for k in sorted(keys)}
    return stats


# ---------------------------------------------------------------- document blocks


def _order(strategies: Any) -> list[str]:
    """Registration order; a row at another setting (`NAME:key=value`) right after NAME's."""
    rank = {s: i for i, s in enumerate(strategy_order())}
    return sorted(strategies, key=lambda s: (rank.get(s.split(":")[0], len(rank)), s))


def _label(run: dict[str, Any]) -> str:
    return f"{run['strategy']} seed {run.get('seed')}, order {'→'.join(map(str, run['order']))}"


def _ratio_table(stats: dict[str, dict[str, P.Stat]]) -> Block | None:
    """Ratios of means against ``naive`` and ``joint``, where those strategies ran."""
    refs = [r for r in RATIOS if r[1] in stats]
    if not refs:
        return None
    rows = []
    for name, st in stats.items():
        row = [name]
        for key, ref, _, pct in refs:
            x, base = st.get(key, (NAN,))[0], stats[ref].get(key, (NAN,))[0]
            if not (math.isfinite(x) and math.isfinite(base) and base > 0):
                row.append("—")  # a ratio to a non-positive reference has no meaning
            else:
                row.append(f"{x / base - 1:+.1%}" if pct else f"{x / base:.2f}×")
        rows.append(row)
    return ("table", ["strategy", *[r[2] for r in refs]], rows)


def _routing_table(stats: dict[str, dict[str, P.Stat]], first: dict[str, Any]) -> Block | None:
    rows = []
    for name, st in stats.items():
        acc = st.get("routing_accuracy", (NAN, NAN, 0))
        if acc[2] == 0:
            continue
        conf = (first[name].get("routing") or {}).get("confusion")
        per = M.routing_per_domain(conf) if conf else []
        detail = ", ".join(f"{d} {v:.2f}" for d, v in zip(first[name]["order"], per, strict=False))
        gap = st.get("oracle_gap", (NAN, NAN, 0))
        rows.append([name, P.stat_cell(acc, ".3f"), P.stat_cell(gap, "+.2%"), detail or "—"])
    headers = [
        "strategy",
        "routing accuracy",
        "loss gap to oracle routing",
        "per domain (first run)",
    ]
    return ("table", headers, rows) if rows else None


def _header(data: dict[str, Any]) -> list[Block]:
    specs = (data.get("machine") or {}).items()
    machine = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in specs)
    keys = "domains strategies seeds orders tokens_per_domain model batch seq_len".split()
    config = "; ".join(
        f"{k} {v}" for k, v in P.flatten(data.get("config") or {}).items() if k in keys and v
    )
    lines = [
        f"command: `{data.get('command', '?')}`",
        f"date: {data.get('date', '?')}; herllm {data.get('herllm_version', '?')}",
        f"machine: {machine or '?'}",
        f"config: {config or 'see the Configuration section'}",
    ]
    return [("h", 1, "herllm bench report"), ("list", lines)]


def _contended(ok: list[dict]) -> list[str]:
    """One line per run whose timings other processes skewed (see ``CONTENTION_WARN``)."""
    lines = []
    for r in ok:
        cost = r.get("cost") or {}
        c, w = _num(cost.get("contention_cpu_seconds")), _num(cost.get("wall_seconds"))
        if w > 0 and c / w > CONTENTION_WARN:
            lines.append(
                f"{_label(r)}: other processes used {c:.0f} CPU-s in {w:.0f} s ({c / w:.0%})"
            )
    return lines


def _notices(runs: list[dict], ok: list[dict], issues: list[str], busy: list[str]) -> list[Block]:
    """Loud notices: runs without results, skewed timings, recorded figures that disagree."""
    blocks: list[Block] = []
    bad = [r for r in runs if r["status"] != "ok"]
    items = []
    for name in _order({r["strategy"] for r in bad}):
        rs = [r for r in bad if r["strategy"] == name]
        kinds = {(r["status"], r.get("reason") or "no reason given") for r in rs}
        n_ok = sum(r["strategy"] == name for r in ok)
        scope = "no row, no figures" if n_ok == 0 else f"its {n_ok} ok run(s) are shown"
        if len(kinds) == 1:
            status, reason = kinds.pop()
            items.append(f"{name}: {status} in {len(rs)} run(s) ({scope}): {reason}")
        else:
            items += [f"{name} seed {r.get('seed')}: {r['status']}: {r.get('reason')}" for r in rs]
    if items:
        blocks.append(("notice", "Runs without results (status is not ok)", items))
    if busy:
        blocks.append(("notice", "Timings skewed by other processes on the machine", busy))
    if issues:
        title = "Recorded metrics disagree with the matrices, or could not be checked against them"
        blocks.append(("notice", title, issues))
    return blocks


def _section(title: str, table: Block | None) -> list[Block]:
    return [("h", 2, title), table] if table else []


def _numbers(ok: list[dict]) -> tuple[dict[str, list[dict[str, float]]], list[str]]:
    """Per-run numbers grouped by strategy (display order), and every disagreement found."""
    per_run: dict[str, list[dict[str, float]]] = {
        n: [] for n in _order({r["strategy"] for r in ok})
    }
    issues = []
    for run in ok:
        figures, problems = run_figures(run)
        per_run[run["strategy"]].append(figures)
        issues += [f"{_label(run)}: {p}" for p in problems]
    return per_run, issues


def _body(data: dict[str, Any], results_dir: Path) -> list[Block]:
    """Every block of the report, in reading order."""
    ok = [r for r in data["runs"] if r["status"] == "ok"]
    per_run, issues = _numbers(ok)
    stats = aggregate(per_run)
    n_ok = {n: len(rows) for n, rows in per_run.items()}
    first = {n: next(r for r in ok if r["strategy"] == n) for n in per_run}
    missing = sorted({r["strategy"] for r in data["runs"]} - set(per_run))
    note = NOTE + (f" No row for: {', '.join(missing)} (see the notice)." if missing else "")
    main = P.stat_table(stats, n_ok, MAIN_COLUMNS, keep_empty=True)
    busy = _contended(ok)
    blocks = [*_header(data), *_notices(data["runs"], ok, issues, busy), ("h", 2, "Main results")]
    blocks += [main or ("p", "No run finished with status ok: there is nothing to tabulate.")]
    blocks += [
        ("p", note),
        *_section("Ratios of means against naive and joint", _ratio_table(stats)),
    ]
    rows = target_rows(stats)
    if rows:
        blocks += _section(
            "her against its targets", ("table", ["target", "measured", "verdict"], rows)
        )
    if rows := baseline_plasticity_rows(stats):
        head = ["row", "plasticity vs naive's", "within 5% of naive's"]
        blocks += _section("Every row's plasticity against naive's", ("table", head, rows))
    if data.get("sweep"):
        from herllm.bench.sweep import sweep_blocks

        blocks += sweep_blocks(data["sweep"])
    domains = list(data.get("domains") or [])
    blocks += P.figure_blocks(first, stats, per_run, domains, results_dir / "plots")
    blocks += _section("Cost", P.stat_table(stats, n_ok, COST_COLUMNS))
    if busy:
        share = f"{CONTENTION_WARN:.0%}"
        blocks.append(("p", f"⚠ Contention above {share} of wall-clock in: {'; '.join(busy)}."))
    blocks += _section("Probe accuracy", P.stat_table(stats, n_ok, PROBE_COLUMNS))
    blocks += _section("Intrinsic signals", P.stat_table(stats, n_ok, INTRINSIC_COLUMNS))
    blocks += _section("Routing", _routing_table(stats, first))
    config = [[k, v] for k, v in P.flatten(data.get("config") or {}).items()]
    return blocks + _section("Configuration", ("table", ["setting", "value"], config))


NOTE = (
    "Mean ± sample std (ddof=1) over a strategy's ok runs (seeds × orders); — = undefined or not "
    "recorded. Losses in nats. BWT and FWT use −loss: BWT < 0 is forgetting, FWT > 0 means "
    "earlier domains lowered a domain's loss before it was seen. Plasticity = mean L[i][i]. "
    "Adapt tokens = tokens until a domain's loss is within 5% of its end-of-segment value. "
    "MFU and contention are in the Cost table."
)


# ---------------------------------------------------------------- entry points


def render_report(results_dir: Path) -> tuple[Path, Path]:
    """Write ``report.md``, ``report.html`` and ``plots/*.png`` next to ``results.json``."""
    results_dir = Path(results_dir)
    data = load_results(results_dir / "results.json")
    blocks = _body(data, results_dir)
    md_path, html_path = results_dir / "report.md", results_dir / "report.html"
    md_path.write_text(P.to_markdown(blocks, results_dir), encoding="utf-8")
    title = f"herllm bench report {data.get('date', '')}".strip()
    html_path.write_text(P.to_html(blocks, title), encoding="utf-8")
    return md_path, html_path


def report_main(results_dir: str) -> int:
    """``herllm report RESULTS_DIR``: check the directory, render, say where the files are."""
    path = Path(results_dir)
    if not path.is_dir():
        raise UserError(f"{path}: not a directory; pass the directory that holds results.json")
    md_path, html_path = render_report(path)
    print(f"report written to {md_path} and {html_path}")
    return 0
