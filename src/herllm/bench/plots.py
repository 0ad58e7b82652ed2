"""How the bench report looks: figures (matplotlib, Agg), table cells, Markdown/HTML writers.

The numbers come from :mod:`herllm.bench.report`; this module only draws and
formats them. No pyplot: figures are plain ``Figure`` objects on an explicit Agg
canvas, so rendering a report never touches the caller's backend or pyplot state.
A run here is one entry of ``results.json``'s ``runs`` list with status ``ok``;
where a figure shows a single run it draws the first ok run of each strategy.
Every ``plot_*`` function writes one PNG and returns its path, or ``None`` when
no run has what the figure needs. The writers turn a list of blocks into Markdown
(figures linked) or into one self-contained HTML page (figures inlined as base64).
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

Run = dict[str, Any]
# A report block: ("h", level, text) | ("p", text) | ("list", items) | ("notice", title, items)
# | ("table", headers, rows) | ("img", title, png_path).
Block = tuple[Any, ...]
Stat = tuple[float, float, int]  # (mean, std, n) over runs
DPI = 100


# ---------------------------------------------------------------- trace helpers (used by report.py)


def is_sequential(run: Run) -> bool:
    """True when the run streamed its domains one after another with a usable trace.

    ``joint`` (all domains shuffled together, ``switch_steps == [0]``) and runs
    without a trace are not: they have no domain switches to measure.
    """
    switches = run.get("switch_steps") or []
    trace = run.get("trace") or []
    return bool(trace) and len(switches) == len(run["order"]) and switches[0] == 0


def is_streamed(run: Run) -> bool:
    """False for a ``joint`` run, which trains on every domain at once (one switch for T > 1)."""
    return len(run.get("switch_steps") or run["order"]) == len(run["order"])


def trace_arrays(run: Run) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(steps, tokens, seconds, losses)`` of a run's trace: three ``(N,)`` and ``(N, T)``."""
    trace = run.get("trace") or []
    steps = np.array([p["step"] for p in trace], dtype=np.int64)
    tokens = np.array([p["tokens"] for p in trace], dtype=np.float64)
    seconds = np.array([p.get("seconds", math.nan) for p in trace], dtype=np.float64)
    losses = np.array([p["losses"] for p in trace], dtype=np.float64).reshape(len(trace), -1)
    return steps, tokens, seconds, losses


def switch_rows(run: Run) -> list[int] | None:
    """Trace index of the evaluation at each switch after the first (domains 2..T).

    ``None`` when the run has no usable switches: it is not sequential, or a switch
    step has no evaluation in its trace (report.py flags that; figures skip the run).
    """
    if not is_sequential(run):
        return None
    steps = np.array([p["step"] for p in run["trace"]])
    rows = []
    for sw in run["switch_steps"][1:]:
        hit = np.flatnonzero(steps == sw)
        if not hit.size:
            return None
        rows.append(int(hit[0]))
    return rows


# ---------------------------------------------------------------- figure plumbing


def strategy_colors(strategies: list[str]) -> dict[str, Any]:
    """One stable colour per strategy, in display order."""
    cmap = colormaps["tab10" if len(strategies) <= 10 else "tab20"]
    return {s: cmap(i % cmap.N) for i, s in enumerate(strategies)}


def _grid(n: int, panel: tuple[float, float], per_row: int = 3) -> tuple[Figure, list[Axes]]:
    """A figure with ``n`` panels, ``per_row`` to a row; unused cells hidden."""
    ncols = min(per_row, n)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(panel[0] * ncols, panel[1] * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = list(fig.subplots(nrows, ncols, squeeze=False).ravel())
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


def _title(name: str, run: Run) -> str:
    return f"{name} (seed {run.get('seed', '?')})"


# ---------------------------------------------------------------- single-run figures


def plot_heatmaps(first_runs: dict[str, Run], path: Path) -> Path | None:
    """Loss-matrix heatmap per strategy: rows = after domain t, columns = domains."""
    if not first_runs:
        return None
    t_max = max(len(r["order"]) for r in first_runs.values())
    side = max(3.6, 0.55 * t_max + 1.6)
    # Two to a row keeps the annotations legible at the page width for up to ~10 domains.
    fig, axes = _grid(len(first_runs), panel=(side + 1.0, side), per_row=2)
    font = 8 if t_max <= 5 else 7
    for ax, (name, run) in zip(axes, first_runs.items(), strict=True):
        m = np.asarray(run["loss_matrix"], dtype=np.float64)  # (T+1, T)
        im = ax.imshow(m, cmap="viridis_r", aspect="auto")
        order = run["order"]
        ax.set_xticks(range(len(order)), order, rotation=40, ha="right", fontsize=font + 1)
        rows = (
            [f"after {d}" for d in order]
            if is_streamed(run)
            else [f"row {i + 1}" for i in range(len(order))]
        )
        ax.set_yticks(range(len(order) + 1), ["base", *rows])
        ax.tick_params(axis="y", labelsize=font + 1)
        lo, hi = np.nanmin(m), np.nanmax(m)
        spec = ".2f" if hi - lo >= 0.5 else ".3f"  # close losses need the third decimal
        for (r, c), v in np.ndenumerate(m):
            # viridis_r is dark at high values: white text there, black on the light end.
            dark = hi > lo and (v - lo) / (hi - lo) > 0.5
            colour = "white" if dark else "black"
            ax.text(c, r, format(v, spec), ha="center", va="center", fontsize=font, color=colour)
        ax.set_title(_title(name, run), fontsize=10)
        fig.colorbar(im, ax=ax, shrink=0.85, label="held-out NLL (nats)")
    return _save(fig, path)


def _mark_switches(ax: Axes, run: Run, steps: np.ndarray, tokens: np.ndarray) -> None:
    """A dotted vertical line at each domain switch, labelled with the domain it starts."""
    for k, row in enumerate(switch_rows(run) or []):
        ax.axvline(tokens[row], color="grey", ls=":", lw=1.2)
        ax.annotate(
            f"→ {run['order'][k + 1]}", (tokens[row], 1.0), xycoords=("data", "axes fraction"),
            xytext=(2, -3), textcoords="offset points", rotation=90, va="top", fontsize=7,
            color="dimgrey",
        )  # fmt: skip


def plot_loss_over_time(first_runs: dict[str, Run], domains: list[str], path: Path) -> Path | None:
    """Per-domain held-out loss against trained tokens; dotted lines mark domain switches."""
    runs = {k: r for k, r in first_runs.items() if r.get("trace")}
    if not runs:
        return None
    known = list(domains) + sorted({d for r in runs.values() for d in r["order"]} - set(domains))
    palette = strategy_colors(known)  # one colour per domain, the same in every panel
    fig, axes = _grid(len(runs), panel=(5.2, 3.6))
    handles: dict[str, Any] = {}
    for ax, (name, run) in zip(axes, runs.items(), strict=True):
        steps, tokens, _, losses = trace_arrays(run)
        for j, dom in enumerate(run["order"]):
            (line,) = ax.plot(tokens, losses[:, j], marker=".", color=palette[dom], label=dom)
            handles.setdefault(dom, line)
        general = [p.get("general") for p in run["trace"]]
        if all(isinstance(g, int | float) for g in general):
            (line,) = ax.plot(tokens, general, ls="--", color="black", label="general")
            handles.setdefault("general", line)
        _mark_switches(ax, run, steps, tokens)
        ax.set_title(_title(name, run), fontsize=10)
        ax.set_xlabel("trained tokens")
        ax.set_ylabel("held-out NLL (nats)")
        ax.grid(alpha=0.3)
    fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncols=6)
    return _save(fig, path)


def plot_stability_curves(first_runs: dict[str, Run], path: Path) -> Path | None:
    """Loss of earlier domains after each switch, minus its value at the switch.

    One panel per sequential strategy, one line per switch: the mean over the
    domains trained before it. Above 0 is the transient forgetting the stability
    gap measures; the x axis counts tokens since the switch.
    """
    runs = {k: r for k, r in first_runs.items() if len(r["order"]) > 1 and switch_rows(r)}
    if not runs:
        return None
    fig, axes = _grid(len(runs), panel=(5.2, 3.6))
    for ax, (name, run) in zip(axes, runs.items(), strict=True):
        steps, tokens, _, losses = trace_arrays(run)
        rows = switch_rows(run) or []
        ends = [*rows[1:], len(steps) - 1]
        for k, (start, end) in enumerate(zip(rows, ends, strict=True)):
            if end <= start:
                continue  # the trace stops at this switch: nothing after it to draw
            rel = losses[start : end + 1, : k + 1] - losses[start, : k + 1]  # (n, k+1) earlier
            x = tokens[start : end + 1] - tokens[start]
            ax.plot(x, rel.mean(axis=1), marker=".", label=f"→ {run['order'][k + 1]}")
        ax.axhline(0.0, color="black", lw=0.8)
        ax.set_title(_title(name, run), fontsize=10)
        ax.set_xlabel("tokens since the switch")
        ax.set_ylabel("Δ loss of earlier domains")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, title="switch to", title_fontsize=7)
    return _save(fig, path)


# ---------------------------------------------------------------- across-run figures


def plot_forgetting_plasticity(
    stats: dict[str, dict[str, Stat]], colors: dict[str, Any], path: Path
) -> Path | None:
    """Bars of mean ± std forgetting (loss) and plasticity (mean L[i][i]) per strategy."""
    panels = [
        ("forgetting_loss", "forgetting, loss form (higher = more forgetting)"),
        ("plasticity", "plasticity: mean L[i][i] (lower = learns better)"),
    ]
    drawn = False
    fig, axes = _grid(2, panel=(6.0, 4.0))
    for ax, (key, title) in zip(axes, panels, strict=True):
        names = [s for s, st in stats.items() if key in st and np.isfinite(st[key][0])]
        means = [stats[s][key][0] for s in names]
        stds = [np.nan_to_num(stats[s][key][1]) for s in names]  # n = 1: no error bar
        bars = ax.bar(names, means, yerr=stds, capsize=4, color=[colors[s] for s in names])
        ax.bar_label(bars, fmt="%.3f", fontsize=7, label_type="center")  # small gaps stay readable
        ax.axhline(0.0, color="black", lw=0.8)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel("nats")
        ax.tick_params(axis="x", rotation=30)
        drawn = drawn or bool(names)
    return _save(fig, path) if drawn else None


def plot_cost_vs_quality(
    per_run: dict[str, list[dict[str, float]]], colors: dict[str, Any], path: Path
) -> Path | None:
    """Wall-clock seconds against average final loss: one point per run."""
    fig, axes = _grid(1, panel=(7.0, 4.5))
    ax = axes[0]
    drawn = False
    for name, rows in per_run.items():
        pts = [(r.get("wall_seconds", math.nan), r.get("avg_final_loss", math.nan)) for r in rows]
        pts = [p for p in pts if np.isfinite(p).all()]
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.scatter(xs, ys, s=45, color=colors[name], edgecolor="black", lw=0.5, label=name)
            drawn = True
    ax.set_xlabel("wall-clock seconds per run")
    ax.set_ylabel("average final loss (nats)")
    ax.set_title("cost versus quality (lower left is better)", fontsize=10)
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=8)
    return _save(fig, path) if drawn else None


def figure_blocks(
    first: dict, stats: dict, per_run: dict, domains: list, plots: Path
) -> list[Block]:
    """Draw every figure into ``plots/``; one image block per figure that had data."""
    colors = strategy_colors(list(stats))
    # fmt: off
    specs = [
        ("heatmaps", "Loss matrices (first run of each strategy; rows = after domain t)",
         lambda p: plot_heatmaps(first, p)),
        ("loss_over_time", "Held-out loss per domain over training (dotted = domain switch)",
         lambda p: plot_loss_over_time(first, domains, p)),
        ("forgetting_plasticity", "Forgetting and plasticity (mean ± std over runs)",
         lambda p: plot_forgetting_plasticity(stats, colors, p)),
        ("cost_vs_quality", "Cost versus quality (one point per run)",
         lambda p: plot_cost_vs_quality(per_run, colors, p)),
        ("stability_gap", "Stability gap: earlier domains' loss after each switch, relative to it",
         lambda p: plot_stability_curves(first, p)),
    ]
    # fmt: on
    blocks: list[Block] = [("h", 2, "Figures")]
    for name, title, draw in specs:
        path = plots / f"{name}.png"
        path.unlink(missing_ok=True)  # never leave a stale figure from an earlier render
        if draw(path) is not None:
            blocks += [("h", 3, title), ("img", title, path)]
    return blocks


# ---------------------------------------------------------------- tables


def stat_cell(stat: Stat, spec: str) -> str:
    """``mean ± std`` in ``spec`` format; the mean alone for one run; — when undefined."""
    mean, std, _ = stat
    if not math.isfinite(mean):
        return "—"
    return f"{mean:{spec}} ± {std:{spec}}" if math.isfinite(std) else f"{mean:{spec}}"


def stat_table(
    stats: dict[str, dict[str, Stat]],
    n_ok: dict[str, int],
    columns: list,
    keep_empty: bool = False,
) -> Block | None:
    """One row per strategy, ``mean ± std`` per column; columns nobody has are dropped."""

    def has(key: str) -> bool:
        return any(math.isfinite(st.get(key, (math.nan,))[0]) for st in stats.values())

    cols = [c for c in columns if keep_empty or has(c[0])]
    if not cols or not stats:
        return None
    empty = (math.nan, math.nan, 0)
    rows = [
        [name, str(n_ok[name]), *[stat_cell(st.get(k, empty), f) for k, _, f in cols]]
        for name, st in stats.items()
    ]
    return ("table", ["strategy", "runs", *[c[1] for c in cols]], rows)


def flatten(cfg: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config as ``{"lora.r": "8", ...}``; lists joined, long values cut at 120 chars."""
    out: dict[str, str] = {}
    for k, v in cfg.items():
        if isinstance(v, dict):
            out |= flatten(v, f"{prefix}{k}.")
            continue
        text = ", ".join(map(str, v)) if isinstance(v, list) else str(v)
        out[f"{prefix}{k}"] = text if len(text) <= 120 else text[:117] + "..."
    return out


# ---------------------------------------------------------------- writers


def _md_table(headers: list[str], rows: list[list[str]]) -> str:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(headers), line(["---"] * len(headers)), *map(line, rows)])


def to_markdown(blocks: list[Block], root: Path) -> str:
    """Markdown with figures linked relative to ``root`` (the results directory)."""
    out = []
    for kind, *rest in blocks:
        if kind == "h":
            out.append(f"{'#' * rest[0]} {rest[1]}")
        elif kind == "p":
            out.append(rest[0])
        elif kind == "list":
            out.append("\n".join(f"- {x}" for x in rest[0]))
        elif kind == "notice":
            out.append("\n".join([f"> **⚠ {rest[0]}**", ">", *[f"> - {x}" for x in rest[1]]]))
        elif kind == "table":
            out.append(_md_table(*rest))
        elif kind == "img":
            out.append(f"![{rest[0]}]({rest[1].relative_to(root).as_posix()})")
    return "\n\n".join(out) + "\n"


CSS = """body{font-family:system-ui,sans-serif;max-width:1400px;margin:20px auto;padding:0 16px}
body{color:#222}
table{border-collapse:collapse;font-size:12px;margin:6px 0}div.scroll{overflow-x:auto}
th,td{border:1px solid #ccc;padding:3px 6px;white-space:nowrap;text-align:left}
th{background:#eef1f5;white-space:normal;vertical-align:bottom;min-width:3em}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.notice{background:#fff3cd;border:2px solid #c77700;padding:6px 14px;margin:12px 0}
img{max-width:100%;border:1px solid #ddd}code{background:#f3f3f3;padding:0 4px}"""


def _inline(text: str) -> str:
    """Escape for HTML, then turn `code` spans into <code>."""
    parts = html.escape(str(text)).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def _html_table(headers: list[str], rows: list[list[str]]) -> str:
    def td(c: str) -> str:
        numeric = c == "—" or c[:1].isdigit() or (c[:1] in "+-−" and c[1:2].isdigit())
        return f'<td class="num">{_inline(c)}</td>' if numeric else f"<td>{_inline(c)}</td>"

    head = "".join(f"<th>{_inline(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(map(td, r)) + "</tr>" for r in rows)
    return f'<div class="scroll"><table><tr>{head}</tr>{body}</table></div>'


def to_html(blocks: list[Block], title: str) -> str:
    """One self-contained page: inline CSS, every figure a base64 data URI."""
    out = []
    for kind, *rest in blocks:
        if kind == "h":
            out.append(f"<h{rest[0]}>{_inline(rest[1])}</h{rest[0]}>")
        elif kind == "p":
            out.append(f"<p>{_inline(rest[0])}</p>")
        elif kind == "list":
            out.append("<ul>" + "".join(f"<li>{_inline(x)}</li>" for x in rest[0]) + "</ul>")
        elif kind == "notice":
            items = "".join(f"<li>{_inline(x)}</li>" for x in rest[1])
            out.append(
                f'<div class="notice"><strong>⚠ {_inline(rest[0])}</strong><ul>{items}</ul></div>'
            )
        elif kind == "table":
            out.append(_html_table(*rest))
        elif kind == "img":
            data = base64.b64encode(rest[1].read_bytes()).decode("ascii")
            out.append(f'<img alt="{html.escape(rest[0])}" src="data:image/png;base64,{data}">')
    head = f'<meta charset="utf-8"><title>{html.escape(title)}</title><style>{CSS}</style>'
    return (
        f"<!DOCTYPE html>\n<html><head>{head}</head><body>\n"
        + "\n".join(out)
        + "\n</body></html>\n"
    )
