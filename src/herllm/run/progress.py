"""Rich progress bar for the loop: steps, tokens/s, loss, selected fraction, buffer size."""

from __future__ import annotations

import math
import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class LoopProgress:
    """Context manager around rich.Progress; silent when disabled."""

    def __init__(self, total: int | None, start: int, enabled: bool = True):
        self.enabled = enabled
        self.total = total
        self.start_step = start
        self.loss_ema: float | None = None
        self.t0 = time.perf_counter()
        self.tokens0: int | None = None
        self.progress: Progress | None = None

    def __enter__(self) -> LoopProgress:
        if self.enabled:
            console = Console(file=sys.stderr)
            self.progress = Progress(
                TextColumn("[bold]adapt"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.fields[info]}"),
                console=console,
                transient=False,
            )
            self.progress.__enter__()
            self.task = self.progress.add_task(
                "adapt", total=self.total, completed=self.start_step, info=""
            )
        return self

    def update(self, step: int, counters: dict, loss: float, buffer_rows: int) -> None:
        if not math.isnan(loss):
            self.loss_ema = loss if self.loss_ema is None else 0.9 * self.loss_ema + 0.1 * loss
        if self.progress is None:
            return
        if self.tokens0 is None:
            self.tokens0 = counters["tokens_trained"]
        dt = max(time.perf_counter() - self.t0, 1e-9)
        tps = (counters["tokens_trained"] - self.tokens0) / dt
        read = max(counters["selected"] + counters["skipped_by_selection"], 1)
        info = (
            f"{tps:,.0f} tok/s  loss {self.loss_ema or float('nan'):.3f}  "
            f"sel {counters['selected'] / read:.0%}  buffer {buffer_rows:,}"
        )
        self.progress.update(self.task, completed=step, info=info)

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.__exit__(*exc)
