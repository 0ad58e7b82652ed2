"""The run's state: what the learner's loop reads and advances.

`run.build` makes a `RunState` from a config, `run.checkpoint` saves and restores it through its
state registry (`run.stateful`), `run.units` closes and opens knowledge units on it. The engine
(`parallel.engine`) owns the optimizer, the scheduler and the training wrapper.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator

from herllm.acquire.chunks import Experience, Packer, padded_experience, window_batches
from herllm.acquire.follow import FollowedSources
from herllm.acquire.sources import WAIT, SourceStats, read_documents
from herllm.config import RunConfig
from herllm.errors import UserError
from herllm.memory.general import GeneralSampler
from herllm.memory.knowledge.ingest import StreamIngest
from herllm.memory.ledger import Ledger
from herllm.memory.rehearsal import RehearsalSampler
from herllm.memory.replay import ReplayBuffer
from herllm.parallel.engine import Engine
from herllm.parallel.ranks import Ranks
from herllm.refine.shift import ShiftDetector
from herllm.run.stateful import StateRegistry
from herllm.update import adapters as ad
from herllm.update.protection import Protection, StabilityTracker
from herllm.update.strength import DynamicStrength

COUNTERS = (
    "general_replayed", "shifts", "consolidations", "reptile_steps",
    "windows_read", "tokens_streamed", "tokens_scored", "tokens_trained", "selected",
    "skipped_by_selection", "replayed", "nonfinite_skipped", "replaced_by_replay", "rehearsed",
)  # fmt: skip


@dataclass
class RunState:
    cfg: RunConfig
    run_dir: Path
    accelerator: Accelerator
    model: torch.nn.Module
    """The PEFT model: scoring, protection, evaluation and saving use it (the training forward
    goes through `engine.train_model`)."""
    tokenizer: object
    engine: Engine
    selector: object
    buffer: ReplayBuffer | None
    packer: Packer
    source_stats: SourceStats
    eval_sets: dict[str, list[dict]]
    protection: Protection
    detector: ShiftDetector | None
    ledger: Ledger
    general: GeneralSampler | None
    ranks: Ranks
    rehearsal: RehearsalSampler | None = None
    """The base model's own answers replayed with each batch (`replay.rehearsal`), or None."""
    follower: FollowedSources | None = None
    """The documents of a followed stream (`herllm adapt --follow`), None for a plain one."""
    ingest: StreamIngest | None = None
    """Rank 0's writer of read documents into the knowledge store (`knowledge.ingest`)."""
    waiting: bool = False
    """A followed stream had nothing new at the last read."""
    held_s: float = 0.0
    """Seconds the learner held a step while a followed source's owner was busy (this process)."""
    sharded: dict | None = None
    """With an FSDP-sharded base: its parameter count and this rank's share (`shard_model`)."""
    bank: ad.AdapterBank | None = None
    orth: DynamicStrength | None = None
    stability: StabilityTracker = field(default_factory=StabilityTracker)
    registry: StateRegistry = field(default_factory=StateRegistry)
    """Every component a checkpoint saves, by name (`run.build.register_components`)."""
    step: int = 0
    pending: list[Experience] = field(default_factory=list)
    stream_done: bool = False
    counters: dict = field(
        default_factory=lambda: dict.fromkeys(COUNTERS, 0) | {"train_seconds": 0.0}
    )
    eval_first: dict | None = None
    eval_last: dict | None = None
    evaluated_at_start: bool = False
    nonfinite_streak: int = 0
    last_checkpoint: int = -1
    started: float = field(default_factory=time.perf_counter)
    _windows: Iterator[Experience] | None = None
    _open_key: tuple | None = None

    # -- the engine's parts, as the loop and tests name them --------------------------------
    @property
    def optimizer(self):
        return self.engine.optimizer

    @property
    def scheduler(self):
        return self.engine.scheduler

    @property
    def trainable(self) -> list[torch.nn.Parameter]:
        return self.engine.trainable

    # -- stream -----------------------------------------------------------------------------
    def next_windows(self, n: int) -> tuple[list[Experience], bool]:
        """Up to n windows of this rank's stream, and whether a followed stream has nothing more
        yet (it may later; a plain stream that returns fewer than n has ended)."""
        if self._windows is None:
            st = self.cfg.stream
            docs = self.follower if self.follower is not None else read_documents(
                st.sources, st.include, st.exclude, st.on_bad_input, self.source_stats, st.stdin_format
            )  # fmt: skip
            if self.ingest is not None:  # before dealing: rank 0 sees every rank's documents
                docs = self.ingest(docs)
            self._windows = self.packer.windows(self.ranks.shard(iter(docs)))
        out, waiting = [], False
        for w in self._windows:
            if w is WAIT:
                waiting = True
                break
            out.append(w)
            if len(out) == n:
                break
        # Emptiness is judged on the whole stream: on N processes one rank's shard may be empty.
        if (not out and not waiting and self.counters["windows_read"] == 0
                and self.packer.position.windows == 0 and self.source_stats.documents == 0):  # fmt: skip
            skipped = self.source_stats.skipped_count
            why = f" ({skipped} bad inputs skipped)" if skipped else ""
            raise UserError(
                f"the stream is empty: no text in {', '.join(self.cfg.stream.sources)}{why}; "
                "pass files that contain documents"
            )
        return out, waiting

    def row_to_experience(self, row) -> Experience:
        """A replay row (unpadded) back into a padded window."""
        return self.window_to_experience(row.input_ids, row.loss_mask, f"{row.doc_id}@{row.offset}")

    def window_to_experience(
        self, ids: np.ndarray, mask: np.ndarray | None, key: str = ""
    ) -> Experience:
        return padded_experience(key, -1, ids, mask, self.cfg.stream.seq_len, self.packer.pad_id)

    def placeholder_window(self) -> Experience:
        """Two pad tokens (one labelled): the input of a forward or training step a rank runs
        only to stay in step with the others (its result is dropped, its loss counts zero)."""
        return self.window_to_experience(np.array([self.packer.pad_id] * 2), None)

    def reservoir_batches(self, reservoir, batch_size: int = 8) -> list[dict]:
        """A unit's reservoir windows (token ids, loss mask) as padded batches on the device."""
        return window_batches(reservoir, self.cfg.stream.seq_len, self.packer.pad_id,
                              self.accelerator.device, batch_size)  # fmt: skip

    def unit_batches(self) -> list[dict]:
        """A uniform sample of the current knowledge unit, as batches (for consolidation)."""
        if self.ledger.current is None:
            return []
        return self.reservoir_batches(self.ledger.current.reservoir)[
            : self.cfg.protect.consolidate_batches
        ]

    def to_device(self, batch: dict) -> dict:
        return {k: v.to(self.accelerator.device) for k, v in batch.items()}

    # -- adapters ---------------------------------------------------------------------------
    def unit_key(self, unit_id: str, reservoir, reps=None) -> ad.RoutingKey | None:
        """Routing key of a unit from its reservoir windows (None with too few of them); `reps`,
        the windows' base representations kept from scoring, spare the base pass where given."""
        return ad.fit_unit_key(self.model, reservoir, unit_id, self.bank.current, self.cfg.stream.seq_len,
                               self.packer.pad_id, self.accelerator.device, reps)  # fmt: skip

    def window_reps(self, windows, known=None) -> np.ndarray:
        """(N, H) base representations of windows (token ids, loss mask); see `ad.window_reps`."""
        return ad.window_reps(self.model, windows, self.cfg.stream.seq_len, self.packer.pad_id,
                              self.accelerator.device, known)  # fmt: skip

    def inference_model(self):
        """The model as users query it: routed across adapters when the run grows them. The
        unit being learned gets a provisional key from what it has seen so far."""
        if self.bank is None:
            return self.model
        extra = []
        u = self.ledger.current
        if u is not None and self.bank.compose == "route":
            stamp = (u.id, u.seen, self.bank.current)
            if self._open_key is None or self._open_key[0] != stamp:
                self._open_key = (stamp, self.unit_key(u.id, u.reservoir, u.reservoir_reps))
            if self._open_key[1] is not None:
                extra.append(self._open_key[1])
        return ad.RoutedModel(self.accelerator.unwrap_model(self.model), self.bank, extra)

    # -- logs -------------------------------------------------------------------------------
    def log_metrics(self, record: dict) -> None:
        if self.accelerator.is_main_process:
            with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")

    def log_event(self, record: dict) -> None:
        if self.accelerator.is_main_process:
            with open(self.run_dir / "events.jsonl", "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")

    def evaluate_heldout(self) -> dict[str, float]:
        model = self.inference_model()
        return {name: self.ranks.mean_nll(model, b) for name, b in self.eval_sets.items()}
