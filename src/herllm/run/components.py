"""Registry components for the parts of a run that are not a plain `state_dict` owner: the
adapters (PEFT folders beside `trainer.pt`), the engine's optimizer and scheduler (objects the
engine replaces when what trains changes), the RNG, the counters and the log files' lengths."""

from __future__ import annotations

import time

from herllm import atomic
from herllm.memory.ledger import count_lines, truncate_lines
from herllm.run.adapters_io import load_adapters
from herllm.update import adapters as ad


class AdapterWeights:
    """The adapter bank (routing keys, which adapter trains) and, on load, the adapters' weights
    from the PEFT folders of the checkpoint being restored (`restore_from`), then a fresh
    optimizer over what trains. Saved as the bank's state (None without expansion); the folders
    are written by `run.checkpoint`."""

    loads_none = True  # without expansion the bank is None, the weights still load

    def __init__(self, s) -> None:
        self.s = s
        self.restore_from = None
        """`<checkpoint>/adapters` while a checkpoint loads."""

    def state_dict(self):
        return self.s.bank.state_dict() if self.s.bank is not None else None

    def load_state_dict(self, state) -> None:
        s = self.s
        if state is not None and s.bank is not None:
            s.bank = ad.AdapterBank.from_state(state)
        load_adapters(s.model, self.restore_from, s.bank)
        if s.bank is not None:
            ad.activate(s.model, s.bank)
            s.engine.rebuild()
        s.engine.weights_written()  # DeepSpeed: the loaded adapters into its fp32 partitions


class EngineState:
    """The engine's current optimizer or scheduler (the engine replaces them on growth). The
    optimizer's state is gathered on every rank (a collective under DeepSpeed) and kept on 0."""

    def __init__(self, engine, attr: str) -> None:
        self.engine, self.attr = engine, attr

    def state_dict(self):
        if self.attr == "optimizer":
            return self.engine.optimizer_state()
        return getattr(self.engine, self.attr).state_dict()

    def load_state_dict(self, state) -> None:
        getattr(self.engine, self.attr).load_state_dict(state)


class RngState:
    """Python's, numpy's and torch's global generators (each rank's own)."""

    def state_dict(self) -> dict:
        return atomic.rng_state()

    def load_state_dict(self, state: dict) -> None:
        atomic.set_rng_state(state)


class Counters:
    """The run's counters; `train_seconds` includes the time of this process so far."""

    def __init__(self, s) -> None:
        self.s = s

    def state_dict(self) -> dict:
        c = dict(self.s.counters)
        c["train_seconds"] = self.s.counters["train_seconds"] + (
            time.perf_counter() - self.s.started
        )
        return c

    def load_state_dict(self, state: dict) -> None:
        self.s.counters.update(state)


class LogLines:
    """How many lines a run log (metrics.jsonl, events.jsonl) had at the checkpoint: what was
    logged after it happens again after a resume, so it is cut off (rank 0 writes the logs)."""

    def __init__(self, s, name: str) -> None:
        self.s, self.name = s, name

    def state_dict(self) -> int:
        return count_lines(self.s.run_dir / self.name)

    def load_state_dict(self, lines: int) -> None:
        if self.s.accelerator.is_main_process:
            truncate_lines(self.s.run_dir / self.name, lines)
