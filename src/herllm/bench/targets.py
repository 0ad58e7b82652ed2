"""`her`'s targets from the benchmark issue, checked on a run's means: met or short, by how much.

Each target compares means measured side by side in the same results (ratios, so a shared or
noisy machine skews both sides alike). A target whose reference strategy did not run is left out.
"""

from __future__ import annotations

import math

Stat = tuple[float, float, int]

# (label, metric key, reference strategy, kind, limit)
#   "rel": her / ref - 1 <= limit (e.g. within 1% of joint)
#   "share": her / ref <= limit (e.g. at most 25% of naive's)
#   "below": her < ref
TARGETS = [
    ("average final loss within 1% of joint", "avg_final_loss", "joint", "rel", 0.01),
    ("forgetting at most 25% of naive's", "forgetting_loss", "naive", "share", 0.25),
    ("forgetting below replay's", "forgetting_loss", "replay", "below", None),
    ("average final loss below replay's", "avg_final_loss", "replay", "below", None),
    ("plasticity within 2% of naive", "plasticity", "naive", "rel", 0.02),
    ("general-ability delta at most 25% of naive's", "general_delta", "naive", "share", 0.25),
    ("instruction-answer delta at most 25% of naive's", "instruct_delta", "naive", "share", 0.25),
    ("wall-clock at most 1.3x naive", "wall_seconds", "naive", "share", 1.3),
]


def target_rows(stats: dict[str, dict[str, Stat]], strategy: str = "her") -> list[list[str]]:
    """One row per target that can be checked: target, measured, verdict."""
    rows = []
    mine = stats.get(strategy)
    if not mine:
        return rows
    for label, key, ref, kind, limit in TARGETS:
        if ref not in stats:
            continue
        x, base = mine.get(key, (math.nan,))[0], stats[ref].get(key, (math.nan,))[0]
        if not (math.isfinite(x) and math.isfinite(base)) or (kind != "below" and base <= 0):
            rows.append([label, "—", "not measurable (undefined mean)"])
            continue
        if kind == "rel":
            value, ok = x / base - 1, x / base - 1 <= limit
            shown = f"{x:.4g} vs {base:.4g}: {value:+.1%}"
            short = f"short by {100 * (value - limit):.1f} percentage points"
        elif kind == "share":
            value, ok = x / base, x / base <= limit
            shown = f"{x:.4g} vs {base:.4g}: " + (f"{value:.2f}x" if limit > 1 else f"{value:.1%}")
            short = (
                f"short by {value - limit:.2f}x"
                if limit > 1
                else f"short by {100 * (value - limit):.1f} percentage points"
            )
        else:
            ok = x < base
            shown, short = f"{x:.4g} vs {base:.4g}", f"above {ref} by {x - base:.4g}"
        rows.append([label, shown, "met" if ok else short])
    return rows


def baseline_plasticity_rows(
    stats: dict[str, dict[str, Stat]], limit: float = 0.05
) -> list[list[str]]:
    """Every streamed row but naive against naive's plasticity: a baseline that barely learns
    (more than `limit` above naive's loss on the domain just learned) is a straw man."""
    ref = stats.get("naive", {}).get("plasticity", (math.nan,))[0]
    rows = []
    for name, figures in stats.items():
        x = figures.get("plasticity", (math.nan,))[0]
        if name == "naive" or not (math.isfinite(x) and math.isfinite(ref) and ref > 0):
            continue
        value = x / ref - 1
        verdict = (
            "met" if value <= limit else f"short by {100 * (value - limit):.1f} percentage points"
        )
        rows.append([name, f"{x:.4g} vs {ref:.4g}: {value:+.1%}", verdict])
    return rows
