"""The knowledge benchmark's report: one table of rows (means over orders) and the targets."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from herllm.evaluate.knowledge import ratio, relative_drop

COLUMNS = [("mem_em", "mem EM"), ("gen_em", "para EM"), ("hard_gen_em", "comp EM"),
           ("mem_nll", "mem NLL"), ("gen_nll", "para NLL"), ("hard_gen_nll", "comp NLL"),
           ("recall@1", "recall@1"), ("recall@k", "recall@k"), ("general_delta", "general Δ"),
           ("earlier_drop", "earlier EM drop"), ("tokens_trained", "tokens trained"),
           ("seconds", "wall s")]  # fmt: skip


def row_values(run: dict, base_general: float, k: int) -> dict:
    """The table's figures of one (row, order) run."""
    f = run["final"]
    first, last = run["quarters"][0]["first_docs"], run["quarters"][-1]["first_docs"]
    em = lambda s: np.mean([s[f"{x}_em"] for x in ("mem", "gen")])  # noqa: E731
    return {**{c: f.get(c) for c, _ in COLUMNS[:6]}, "recall@1": f.get("recall@1"),
            "recall@k": f.get(f"recall@{k}"), "general_delta": run["general_nll"] - base_general,
            "earlier_drop": relative_drop(em(first), em(last)), "first_em_q1": em(first),
            "first_em_q4": em(last), "tokens_trained": run["tokens_trained"],
            "seconds": run["seconds"], "latency": (run.get("latency") or {}).get("overhead")}  # fmt: skip


def means(results: dict) -> dict[str, dict]:
    k = results["config"]["k"]
    base = {r["order"]: r["general_nll"] for r in results["runs"] if r["row"] == "base"
            and r["status"] == "ok"}  # fmt: skip
    acc: dict[str, dict[str, list]] = {}
    for r in results["runs"]:
        if r["status"] != "ok" or r["order"] not in base:
            continue
        for key, v in row_values(r, base[r["order"]], k).items():
            if v is not None and math.isfinite(v):
                acc.setdefault(r["row"], {}).setdefault(key, []).append(float(v))
    return {row: {k: float(np.mean(v)) for k, v in vals.items()} for row, vals in acc.items()}


def _fmt(v, key: str) -> str:
    if v is None:
        return "—"
    if key in ("tokens_trained",):
        return f"{v:,.0f}"
    if key == "seconds":
        return f"{v:.0f}"
    if key.endswith("_em") or key.startswith("recall") or key == "earlier_drop":
        return f"{v:.1%}"
    return f"{v:.3f}"


def targets(m: dict[str, dict]) -> list[tuple[str, str, str]]:
    """(target, measured, verdict) for every target whose rows ran."""
    out = []

    def get(row, key):
        return m.get(row, {}).get(key, math.nan)

    def check(label, x, limit, kind, why=""):
        if not math.isfinite(x):
            out.append((label, "—", "not measurable (a row did not run or is undefined)"))
            return
        ok = x >= limit if kind == ">=" else x <= limit
        by = f"missed by {abs(x - limit):.1%}" + (f" ({why})" if why else "")
        out.append((label, f"{x:.1%}", "met" if ok else by))

    for kind, name in (("mem", "memorisation"), ("gen", "paraphrase")):
        check(f"knowledge >= 90% of in-context EM ({name})",
              ratio(get("knowledge", f"{kind}_em"), get("in-context", f"{kind}_em")), 0.9, ">=")  # fmt: skip
    check("consolidated >= 50% of in-context paraphrase EM",
          ratio(get("consolidated", "gen_em"), get("in-context", "gen_em")), 0.5, ">=")  # fmt: skip
    for ref in ("passage-ft", "naive-1"):
        x, y = get("consolidated", "gen_em"), get(ref, "gen_em")
        if math.isfinite(x) and math.isfinite(y):
            tok = f"{get('consolidated', 'tokens_trained'):,.0f} vs {get(ref, 'tokens_trained'):,.0f} tokens"
            out.append((f"consolidated beats {ref} on paraphrase EM", f"{x:.1%} vs {y:.1%} ({tok})",
                        "met" if x > y else f"missed by {y - x:.1%}"))  # fmt: skip
    label, naive = (
        "general-ability loss of knowledge+consolidate <= 25% of naive-1's",
        get("naive-1", "general_delta"),
    )
    if math.isfinite(naive) and naive <= 0:  # a share of a non-loss means nothing
        kc = get("knowledge+consolidate", "general_delta")
        out.append((label, f"{kc:+.4f} vs {naive:+.4f} nats", "not measurable: naive-1 lost none"))
    else:
        check(label, ratio(get("knowledge+consolidate", "general_delta"), naive), 0.25, "<=")
    for row in ("knowledge+consolidate", "knowledge"):
        check(f"earlier documents' EM drop, first to last quarter <= 10% ({row})",
              get(row, "earlier_drop"), 0.10, "<=")  # fmt: skip
    check("retrieval adds <= 30% latency", get("knowledge", "latency"), 0.30, "<=")
    return out


def write_report(out: Path, results: dict) -> Path:
    m = means(results)
    cfg, mach = results["config"], results["machine"]
    rows = [r for r in dict.fromkeys(x["row"] for x in results["runs"])]
    lines = [
        "# Knowledge benchmark (Fictional Knowledge, development half)", "",
        f"- command: `{results.get('command')}`", f"- date: {results['date']}",
        f"- machine: {mach['platform']}, {mach['cpus']} CPUs, torch {mach['torch']}, {mach['device']}",
        f"- model {cfg['model']}; {cfg['docs']} documents, {cfg['orders']} order(s), "
        f"P={cfg['passes']} passes; retrieval k={cfg['k']} ({cfg['encoder']}); consolidation "
        f"{cfg['consolidate_passes']} passes at lr {cfg['consolidate_lr']:g} over, per item, "
        f"{cfg['prompts']} teacher continuations x {cfg['new_tokens']} tokens"
        f"{', the passage' if cfg.get('whole') else ''}, {cfg.get('shuffles', 0)} reorderings, "
        f"{cfg.get('rewrites', 0)} rewrites x {cfg.get('rewrite_tokens', 0)} tokens, and general "
        f"anchor windows (up to {cfg.get('anchor_windows', 0)}); gate tolerance "
        f"{cfg['tolerance']:.0%}", "",
        "EM: exact match of the greedy continuation (folded) after the whole stream; NLL: target "
        "nats/token; general Δ: held-out general NLL minus the base's; earlier EM drop: relative "
        "drop of the first quarter's documents' mem+para EM from the first to the last quarter.", "",
        "| row | " + " | ".join(c for _, c in COLUMNS) + " |",
        "|---" * (len(COLUMNS) + 1) + "|",
    ]  # fmt: skip
    for row in rows:
        vals = m.get(row)
        if vals is None:
            bad = [x for x in results["runs"] if x["row"] == row and x["status"] != "ok"]
            reason = bad[0].get("reason") if bad else "no result"
            lines.append(f"| {row} | failed: {reason} |" + " |" * (len(COLUMNS) - 1))
            continue
        lines.append(f"| {row} | " + " | ".join(_fmt(vals.get(k), k) for k, _ in COLUMNS) + " |")
    lines += ["", "## Targets", "", "| target | measured | verdict |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in targets(m)]
    cons = [c for r in results["runs"] if r["row"] == "knowledge+consolidate"
            for c in r.get("consolidations", [])]  # fmt: skip
    if cons:
        lines += ["", "## Consolidations", "", "| entry | accepted | items | KL before | KL after "
                  "| tokens | retention before -> after | reason |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for c in cons:
            ret = ", ".join(f"{k} {c['retention_before'][k]:.3f}->{v:.3f}"
                            for k, v in c["retention_after"].items())  # fmt: skip
            lines.append(f"| {c['entry']} | {c['accepted']} | {len(c['items'])} | "
                         f"{c['kl_before']:.3f} | {c['kl_after']:.3f} | {c['tokens_trained']:,} | "
                         f"{ret} | {c['reason'] or ''} |")  # fmt: skip
    lat = [r["latency"] for r in results["runs"] if r["row"] == "knowledge" and r.get("latency")]
    if lat:
        lines += ["", f"Latency (median s per answer of 8 tokens): plain {lat[0]['plain']:.3f}, "
                  f"with retrieval {lat[0]['retrieval']:.3f} (+{lat[0]['overhead']:.0%})."]  # fmt: skip
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out / "summary.json").write_text(json.dumps(m, indent=1))
    return path
