"""Cost meters for the benchmark: wall-clock, peak memory, CPU contention, FLOPs and MFU.

Shared machines skew timings, so every run also records how much CPU time *other* processes
used while it ran (`contention_cpu_seconds`): the machine's busy time from /proc/stat minus
this process's own CPU time. A large value means the timings of that run are pessimistic.
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass

import torch


def _machine_busy_seconds() -> float | None:
    """Busy CPU seconds of the whole machine since boot (Linux), None elsewhere."""
    try:
        with open("/proc/stat", encoding="ascii") as fh:
            fields = [int(x) for x in fh.readline().split()[1:]]
    except OSError:
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark for this process (Linux >= 4.0); False if impossible."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak resident memory since the last reset (VmHWM), else since the process started."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class Meter:
    """Accumulates the seconds spent inside `with meter:` blocks, and what others used meanwhile."""

    seconds: float = 0.0
    contention: float = 0.0
    rss_reset: bool = False

    def start(self) -> Meter:
        self.rss_reset = reset_peak_rss()
        return self

    def __enter__(self) -> Meter:
        self._t0 = time.perf_counter()
        self._busy0 = _machine_busy_seconds()
        self._own0 = _own_cpu_seconds()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds += time.perf_counter() - self._t0
        busy = _machine_busy_seconds()
        if busy is not None and self._busy0 is not None:
            others = (busy - self._busy0) - (_own_cpu_seconds() - self._own0)
            self.contention += max(others, 0.0)


def matmul_flops_per_token(model) -> float:
    """2 x (parameters used in matmuls per token): every Linear, including the LM head.

    Embedding lookups are not matmuls; attention score FLOPs are added by the caller.
    """
    total = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            total += module.weight.numel()
    return 2.0 * total


def train_flops_per_token(model, seq_len: int) -> float:
    """Forward + backward FLOPs per trained token with frozen base weights (LoRA).

    Forward 2N; backward needs input gradients through every layer (2N) but weight gradients
    only for the small adapters, so about 4N in all, plus attention (QK^T and AV, 2 x 2 x T x d
    per layer forward, doubled for backward).
    """
    cfg = getattr(model, "config", None)
    layers = getattr(cfg, "num_hidden_layers", 0) or 0
    hidden = getattr(cfg, "hidden_size", 0) or 0
    attention = 2 * 2 * 2 * seq_len * hidden * layers
    return 2.0 * matmul_flops_per_token(model) + attention


def measure_matmul_peak(seconds: float = 1.0, n: int = 1024) -> float:
    """Achieved fp32 GFLOP/s of a large square matmul on this device: the MFU denominator."""
    a = torch.randn(n, n)
    b = torch.randn(n, n)
    torch.mm(a, b)  # warm-up
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        torch.mm(a, b)
        done += 1
    return 2.0 * n**3 * done / (time.perf_counter() - t0) / 1e9
