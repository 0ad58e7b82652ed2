"""The learning ledger: an append-only history of knowledge units, for inspection and rollback.

A knowledge unit is the stretch of stream between two detected shifts. When one closes, the
ledger records when it was learned (steps, tokens), what opened it (the shift event), how much of
it was seen and selected, which adapters it trained, its stability (held-out loss on a reservoir
of its own samples, then re-measured at every later close) and its dependencies (earlier units
whose representations it overlaps). The adapters and trainer state at the close are saved under
`units/<id>/`, so `herllm rollback RUN --to <id>` can restore them.

The file is `ledger.jsonl` in the run directory. Each checkpoint stores how many lines were
committed with it; a resumed run truncates the file to that count, so a crash never leaves
duplicate records behind.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from herllm.errors import UserError


def truncate_lines(path: Path, keep: int) -> None:
    """Keep the first `keep` lines of a JSONL file (drop what a crashed run appended later)."""
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    if len(lines) > keep:
        path.write_text("".join(lines[:keep]), encoding="utf-8")


def count_lines(path: Path) -> int:
    return len(path.read_text(encoding="utf-8").splitlines()) if path.exists() else 0


@dataclass
class OpenUnit:
    """Bookkeeping of the unit being learned now."""

    id: str
    opened_step: int
    opened_tokens: int
    event: dict | None
    seen: int = 0
    selected: int = 0
    rep_sum: np.ndarray | None = None
    rep_count: int = 0
    """Windows whose representations `rep_sum` adds up (0 in units saved before it: all seen)."""
    reservoir: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    """Up to `reservoir_size` windows of this unit (algorithm R): its own held-out probe."""
    reservoir_index: list[int] = field(default_factory=list)
    """Stream index of each reservoir window: the shift detector's (0-based over the windows it
    saw); a window it did not see takes the index of the next one it sees."""
    reservoir_reps: list[np.ndarray | None] = field(default_factory=list)
    """(H,) base-model representation of each reservoir window, as the scoring pass computed it
    (`Ledger(keep_reps=True)`), so a routing key needs no base pass of its own; None where the
    pass computed none (representations of the adapted model, no scoring, or a unit saved
    before they were kept)."""

    def __post_init__(self) -> None:
        missing = len(self.reservoir) - len(self.reservoir_reps)  # a unit saved before reps
        self.reservoir_reps = list(self.reservoir_reps) + [None] * missing

    def split_at(self, start: int) -> tuple[list, list]:
        """Reservoir windows read before stream index `start`, and from it on (a unit closes
        only after its successor has begun: the detector needs samples to confirm a shift)."""
        before = [w for w, i in zip(self.reservoir, self.reservoir_index, strict=True) if i < start]
        after = [w for w, i in zip(self.reservoir, self.reservoir_index, strict=True) if i >= start]
        return before, after

    def split_reps_at(self, start: int) -> tuple[list, list]:
        """`reservoir_reps` split as `split_at(start)` splits the windows."""
        pairs = list(zip(self.reservoir_reps, self.reservoir_index, strict=True))
        return [r for r, i in pairs if i < start], [r for r, i in pairs if i >= start]


class Ledger:
    """Knowledge units and events of one run (see module doc)."""

    def __init__(
        self,
        run_dir: Path,
        reservoir_size: int = 32,
        seed: int = 0,
        writer: bool = True,
        keep_reps: bool = False,
    ):
        self.path = run_dir / "ledger.jsonl"
        self.units_dir = run_dir / "units"
        self.reservoir_size = reservoir_size
        self.keep_reps = keep_reps
        """Keep the base representation of each reservoir window (routing keys need them)."""
        self.rng = np.random.default_rng(seed)
        self.writer = writer
        self.current: OpenUnit | None = None
        self.closed: dict[str, dict] = {}  # id -> {"mean_rep": ..., "reference": ...}
        self.count = 0
        self.total = 0  # windows observed over the whole stream
        self.indexed = 0  # of them, those the shift detector saw (its sample index)

    # -- events -----------------------------------------------------------------------------
    def append(self, record: dict) -> None:
        if self.writer:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
        self.count += 1

    def open_unit(self, step: int, tokens: int, event: dict | None) -> str:
        unit_id = f"unit-{len(self.closed) + 1:04d}"
        self.current = OpenUnit(unit_id, step, tokens, event)
        self.append(
            {"type": "open", "unit": unit_id, "step": step, "tokens": tokens, "event": event}
        )
        return unit_id

    def observe(
        self,
        windows: list[tuple[np.ndarray, np.ndarray]],
        selected: np.ndarray,
        reps: torch.Tensor | None,
        base: bool = False,
        detected: bool = True,
    ) -> None:
        """Account the windows (token ids, loss mask) read in the current unit; reps (B, H),
        the base model's when `base` (then kept with the reservoir windows, if `keep_reps`).
        `detected=False`: the shift detector did not see these windows (unscored), so they
        take the stream index of the next window it sees."""
        u = self.current
        u.seen += len(windows)
        self.total += len(windows)
        u.selected += int(selected.sum())
        if reps is not None:  # None when the loop did not score (plain fine-tuning)
            r = reps.double().sum(0).numpy()
            u.rep_sum = r if u.rep_sum is None else u.rep_sum + r
            u.rep_count += len(reps)
        keep = self.keep_reps and base and reps is not None
        rows = reps.float().numpy() if keep else None  # (B, H)
        self.indexed += len(windows) if detected else 0
        for k, w in enumerate(windows):  # reservoir sampling: a uniform sample of the unit
            index = self.indexed - len(windows) + k if detected else self.indexed
            rep = rows[k].copy() if keep else None
            if len(u.reservoir) < self.reservoir_size:
                u.reservoir.append(w)
                u.reservoir_index.append(index)
                u.reservoir_reps.append(rep)
            else:
                j = int(self.rng.integers(0, u.seen - len(windows) + k + 1))
                if j < self.reservoir_size:
                    u.reservoir[j] = w
                    u.reservoir_index[j] = index
                    u.reservoir_reps[j] = rep

    def close_unit(
        self, step: int, tokens: int, adapters: list[str], ref_loss: float, stability: dict
    ) -> dict:
        """Record the unit's summary; returns the record (the caller saves the snapshot)."""
        u = self.current
        mean = u.rep_sum / max(u.rep_count or u.seen, 1) if u.rep_sum is not None else None
        deps = self.dependencies(mean)
        record = {
            "type": "close", "unit": u.id, "opened_step": u.opened_step, "opened_tokens": u.opened_tokens,
            "closed_step": step, "closed_tokens": tokens, "opened_by": u.event, "samples_seen": u.seen,
            "samples_selected": u.selected, "adapters": adapters, "reference_loss": ref_loss,
            "stability": stability, "dependencies": deps, "snapshot": f"units/{u.id}",
        }  # fmt: skip
        self.closed[u.id] = {"mean_rep": mean, "reference": list(u.reservoir)}
        self.append(record)
        return record

    def dependencies(self, mean: np.ndarray | None, threshold: float = 0.5) -> list[dict]:
        """Earlier units whose centred mean representation points the same way (cosine)."""
        means = {k: v["mean_rep"] for k, v in self.closed.items() if v["mean_rep"] is not None}
        if mean is None or not means:
            return []
        centre = np.mean([*means.values(), mean], axis=0)
        a = mean - centre
        out = []
        for uid, m in means.items():
            b = m - centre
            cos = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))
            if cos >= threshold:
                out.append({"unit": uid, "similarity": round(cos, 4)})
        return out

    # -- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"current": vars(self.current) if self.current else None, "closed": self.closed,
                "count": self.count, "total": self.total, "indexed": self.indexed,
                "rng": self.rng.bit_generator.state}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        self.current = OpenUnit(**state["current"]) if state["current"] else None
        self.closed = state["closed"]
        self.count = state["count"]
        self.total = state.get("total", 0)
        self.indexed = state.get("indexed", self.total)  # before unscored windows: every one
        self.rng.bit_generator.state = state["rng"]
        if self.writer:
            truncate_lines(self.path, self.count)


def read_ledger(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "ledger.jsonl"
    if not path.is_file():
        raise UserError(f"{path} does not exist; pass a run directory written by herllm adapt")
    return [
        json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
    ]


def unit_table(records: list[dict]) -> list[dict]:
    """One row per unit: closed units with their summary, the open one with what is known."""
    rows: dict[str, dict] = {}
    for r in records:
        if r["type"] == "open":
            rows[r["unit"]] = {"unit": r["unit"], "opened_step": r["step"], "opened_tokens": r["tokens"],
                               "opened_by": r["event"], "status": "open"}  # fmt: skip
        elif r["type"] == "close":
            rows[r["unit"]] = {**rows.get(r["unit"], {}), **r, "status": "closed"}
        elif r["type"] == "rollback":
            for row in rows.values():
                row.setdefault("rollbacks", []).append(r) if row["unit"] == r["to"] else None
    return list(rows.values())
