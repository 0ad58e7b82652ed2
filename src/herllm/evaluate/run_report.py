"""The report of one `herllm adapt` run: held-out loss over the stream, knowledge units, counters.

Written to `RUN/report/` (report.md and heldout.png) at the end of every run, from the run's own
metrics.jsonl and ledger.jsonl, so it can also be re-rendered from a finished run directory.
"""

from __future__ import annotations

import json
from pathlib import Path


def write_run_report(run_dir: str | Path, summary: dict | None = None) -> Path:
    run = Path(run_dir)
    out = run / "report"
    out.mkdir(exist_ok=True)
    metrics = _jsonl(run / "metrics.jsonl")
    ledger = _jsonl(run / "ledger.jsonl")
    lines = [f"# herllm run: {run}", ""]
    if summary:
        lines += ["| counter | value |", "|---|---:|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in summary.items() if not isinstance(v, dict)]
        lines.append("")
    evals = [m for m in metrics if m.get("eval_nll")]
    if evals:
        first, last = evals[0]["eval_nll"], evals[-1]["eval_nll"]
        lines += [
            "## Held-out loss (mean token NLL, nats)",
            "",
            "| file | start | end | change |",
            "|---|---:|---:|---:|",
        ]
        lines += [
            f"| {k} | {first[k]:.4f} | {last[k]:.4f} | {last[k] - first[k]:+.4f} |"
            for k in first
            if k in last
        ]
        lines += ["", "![held-out loss](heldout.png)", ""]
        _plot(evals, ledger, out / "heldout.png")
    units = [r for r in ledger if r["type"] == "close"]
    if units:
        lines += ["## Knowledge units (closed)", "", "| unit | steps | seen | selected | ref. loss | opened by |",
                  "|---|---|---:|---:|---:|---|"]  # fmt: skip
        for u in units:
            ev = u["opened_by"]
            how = f"shift {ev['direction']} (rep z {ev['rep_z']:.1f})" if ev else "start"
            lines.append(f"| {u['unit']} | {u['opened_step']}-{u['closed_step']} | {u['samples_seen']} | "
                         f"{u['samples_selected']} | {u['reference_loss']:.3f} | {how} |")  # fmt: skip
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _plot(evals: list[dict], ledger: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    x = [m["tokens_streamed"] for m in evals]
    for name in evals[0]["eval_nll"]:
        ax.plot(
            x, [m["eval_nll"].get(name) for m in evals], marker="o", ms=3, label=Path(name).stem
        )
    for r in ledger:
        if r["type"] == "open" and r.get("event"):
            ax.axvline(r["tokens"], color="grey", ls="--", lw=1)
    ax.set_xlabel("tokens streamed")
    ax.set_ylabel("held-out NLL (nats)")
    ax.set_title("held-out loss over the stream (dashed: detected shifts)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [
        json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
    ]


def _fmt(v) -> str:
    return f"{v:,.1f}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v)
