"""What a run returns: its counters, timing and first and last held-out losses (`Summary`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class Summary:
    run_dir: str
    steps: int
    windows_read: int
    tokens_streamed: int
    tokens_scored: int
    tokens_trained: int
    selected: int
    skipped_by_selection: int
    replayed: int
    general_replayed: int
    """General rows trained, general text and rehearsal answers."""
    rehearsed: int
    """Of those, the base model's own answers (`replay.rehearsal`)."""
    shifts: int
    consolidations: int
    reptile_steps: int
    bad_inputs_skipped: int
    buffer_rows: int
    nonfinite_skipped: int
    replaced_by_replay: int
    wall_seconds: float
    train_tokens_per_s: float
    eval_first: dict[str, float] = field(default_factory=dict)
    eval_last: dict[str, float] = field(default_factory=dict)


def summarize(s) -> Summary:
    """The run's figures so far, from its state (`run.state.RunState`)."""
    c = s.counters
    wall = c["train_seconds"] + (time.perf_counter() - s.started)
    keys = ("windows_read", "tokens_streamed", "tokens_scored", "tokens_trained", "selected",
            "skipped_by_selection", "replayed", "general_replayed", "shifts", "consolidations",
            "reptile_steps", "nonfinite_skipped", "replaced_by_replay", "rehearsed")  # fmt: skip
    return Summary(
        run_dir=str(s.run_dir),
        steps=s.step,
        bad_inputs_skipped=s.source_stats.skipped_count,
        buffer_rows=len(s.buffer) if s.buffer else 0,
        wall_seconds=wall,
        train_tokens_per_s=c["tokens_trained"] / wall if wall > 0 else 0.0,
        eval_first=s.eval_first or {},
        eval_last=s.eval_last or {},
        **{k: c[k] for k in keys},
    )
