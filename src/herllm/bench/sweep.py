"""Baselines at their best: each swept strategy's setting is chosen on tuning domains alone.

`herllm bench --tune-domains A,B,C,D --domains E,F,G,H` first runs every point of each swept
strategy's grid on the tuning domains (same budget, `--tune-orders` orders), picks the point
with the lowest average final held-out loss (it weighs what is learned against what is
forgotten, in the benchmark's own unit), and then reports every row on the test domains, which
no choice has seen. The grid, every point's figures and the choice are written to
results.json (`sweep`) and the report.

`her` is swept on its buffer-replay share like `replay` (its general rows stay at 12.5%). Its
other settings were set in round 1 on the bundled stream as a whole, so on the bundled domains
its test split is not unseen by its author; a `--stream-dir` split is. Strategies without a grid
run at their registered settings: `naive`, `olora`, and the reference rows.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np

from herllm.errors import UserError

STRENGTHS = (0.001, 0.01, 0.1)
SWEEPS: dict[str, tuple[str, tuple]] = {
    "replay": ("replay.ratio", (0.125, 0.25, 0.5)),
    "ewc": ("protect.strength", STRENGTHS),
    "mas": ("protect.strength", STRENGTHS),
    "si": ("protect.strength", STRENGTHS),
    "lwf": ("protect.strength", STRENGTHS),
    "mer": ("protect.reptile_every", (10, 50, 200)),
    "her": ("replay.ratio", (0.125, 0.25, 0.375)),
}
"""Strategy -> (config key, values). Three points each: the registered default and one step
either side of it (a decade for penalty strengths, which barely learn at the default); for
`her`, its default and two larger shares (replay's sweep chose its largest)."""
CRITERION = "avg_final_loss"


def test_domains(bc) -> list[str]:
    """The domains rows are reported on: `bc.domains`, or every domain not used for tuning."""
    from herllm.acquire.corpus import DOMAINS

    if bc.domains:
        shared = sorted(set(bc.domains) & set(bc.tune_domains))
        if shared:
            raise UserError(
                f"--tune-domains and --domains share {', '.join(shared)}; a setting chosen on a "
                "domain cannot be tested on it, so give disjoint lists"
            )
        return list(bc.domains)
    every = (
        sorted(p.name for p in Path(bc.stream_dir).iterdir() if (p / "train.txt").is_file())
        if bc.stream_dir else list(DOMAINS)
    )  # fmt: skip
    rest = [d for d in every if d not in bc.tune_domains and d != "general"]
    if len(rest) < 2:
        raise UserError(
            f"--tune-domains leaves {len(rest)} domain(s) to test on; keep at least 2 out of it"
        )
    return rest


def tune(bc, run_one, domain_orders, progress=print) -> dict[str, dict]:
    """Run each swept strategy of `bc.strategies` over its grid on `bc.tune_domains` (with the
    runner's `run_one` and `domain_orders`, passed in so this module does not import it); return
    {strategy: {"key", "points": [{"value", "spec", figures...}], "value", "spec"}}."""
    from herllm.bench.data import load_bench_data
    from herllm.evaluate.cost import measure_matmul_peak

    swept = [s for s in bc.strategies if s in SWEEPS]
    if not swept:
        return {}
    tbc = replace(bc, domains=list(bc.tune_domains), orders=bc.tune_orders, tune_domains=[],
                  out=str(Path(bc.out) / "tune"), intrinsic=False)  # fmt: skip
    data = load_bench_data(tbc, Path(tbc.out) / "data")
    peak = measure_matmul_peak()
    out: dict[str, dict] = {}
    for name in swept:
        key, values = SWEEPS[name]
        points = []
        for value in values:
            spec = f"{name}:{key}={value}"
            runs = []
            for k, order in enumerate(domain_orders(data.domains, tbc.orders, tbc.seed)):
                progress(f"[tune] order {k} ({', '.join(order)}): {spec}")
                runs.append(run_one(tbc, data, spec, order, k, peak))
            points.append({"value": value, "spec": spec, **point_figures(runs)})
        best = choose(points)
        out[name] = {"key": key, "points": points, "value": best["value"], "spec": best["spec"],
                     "domains": list(data.domains), "orders": tbc.orders}  # fmt: skip
        progress(f"[tune] {name}: {key}={best['value']} (lowest {CRITERION})")
    return out


FIGURES = ("avg_final_loss", "forgetting_loss", "plasticity", "general_delta")


def point_figures(runs: list[dict]) -> dict:
    """Mean figures of one grid point's runs (NaN when a run failed: such a point is never
    chosen), plus the runs' statuses and trained tokens."""
    ok = [r for r in runs if r["status"] == "ok"]
    fig = {}
    for key in FIGURES:
        vals = [r["metrics"].get(key) for r in ok]
        vals = [v for v in vals if v is not None]
        fig[key] = float(np.mean(vals)) if ok and len(vals) == len(ok) else math.nan
    fig["tokens_trained"] = (
        float(np.mean([r["cost"]["tokens_trained"] for r in ok])) if ok else math.nan
    )
    fig["status"] = sorted({r["status"] for r in runs})
    fig["reasons"] = sorted({r["reason"] for r in runs if r["reason"]})
    return fig


def choose(points: list[dict]) -> dict:
    """The point with the lowest criterion; the first (lowest value) on a tie."""
    finite = [p for p in points if math.isfinite(p[CRITERION])]
    if not finite:
        reasons = "; ".join(r for p in points for r in p["reasons"]) or "no figures"
        raise UserError(f"every sweep point of {points[0]['spec'].split(':')[0]} failed: {reasons}")
    return min(finite, key=lambda p: p[CRITERION])


def sweep_blocks(sweep: dict[str, dict]) -> list[tuple]:
    """The report's section on the sweep: what was tuned where, and every point."""
    tuned = next(iter(sweep.values()))
    text = (
        f"Each swept strategy ran every setting below on the tuning domains "
        f"({', '.join(tuned['domains'])}; {tuned['orders']} order(s)), never on the domains "
        f"reported above; the setting with the lowest {CRITERION.replace('_', ' ')} is the one "
        "its rows use. Strategies not listed run at their registered settings."
    )
    return [("h", 2, "Settings chosen on the tuning domains"), ("p", text), sweep_table(sweep)]


def sweep_table(sweep: dict[str, dict]) -> tuple:
    """The table of every sweep point, the chosen ones marked."""
    rows = []
    for name, s in sweep.items():
        for p in s["points"]:
            cells = [f"{p[k]:.3f}" if math.isfinite(p[k]) else "—" for k in FIGURES]
            mark = "**chosen**" if p["value"] == s["value"] else ""
            rows.append(
                [name, f"{s['key']}={p['value']}", *cells, f"{p['tokens_trained']:,.0f}", mark]
            )
    head = ["strategy", "setting", "avg final loss", "forgetting", "plasticity", "general Δ",
            "tokens trained", ""]  # fmt: skip
    return ("table", head, rows)
