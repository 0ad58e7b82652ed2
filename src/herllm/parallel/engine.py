"""One seam for every way of running the update step: backward, gradient sync, clip, the
finiteness check, the optimizer step and the skip of a bad one.

The learner calls `engine.step(loss, ...)` and nothing else about engines; which engine runs is
decided once, when the run is built (`build_engine`):

- `AccelerateEngine`: one process, or DDP on N (Accelerate prepares the model, the optimizer and
  the scheduler; a change of what trains re-prepares them after `Accelerator.free_memory`).
- `FSDPEngine`: the frozen base sharded by herllm with FSDP2 (`parallel.fsdp`); the adapters stay
  whole on every rank and their gradients are averaged here, after backward.
- `ZeroEngine`: the adapters' optimizer state partitioned by DeepSpeed ZeRO-1/2
  (`parallel.zero`); the engine reduces, clips and steps, and skips a non-finite norm itself.

Each engine keeps the last weights that gave a finite loss, so a skipped step falls back to them.
"""

from __future__ import annotations

import gc
import math
import weakref
from collections.abc import Callable

import torch

from herllm.parallel.zero import ZeroOptimizer


class LinearWarmup:
    """The rate's factor at scheduler step i: linear up to 1 over `steps`, then 1. An object,
    not a lambda, so LambdaLR's state_dict keeps `steps` and a resumed run warms as it did."""

    def __init__(self, steps: int) -> None:
        self.steps = max(int(steps), 1)

    def __call__(self, i: int) -> float:
        return min(1.0, (i + 1) / self.steps)


def make_optimizer(train, params: list[torch.nn.Parameter], warmup: int | None = None):
    """AdamW over `params` with a linear warm-up of `warmup` steps (default
    `train.warmup_steps`), then a constant rate (streams have no end). `train`: the run's
    `TrainConfig`."""
    optimizer = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
    steps = train.warmup_steps if warmup is None else warmup
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, LinearWarmup(steps))
    return optimizer, scheduler


class Engine:
    """What every engine shares: the trainable parameters, the fall-back weights and the step's
    order. Subclasses say how to backward, clip and check, and how to rebuild what trains."""

    def __init__(self, train, model: torch.nn.Module, ranks) -> None:
        self.train = train
        self.model = model
        """The PEFT model itself: scoring, protection, evaluation and saving use it."""
        self.ranks = ranks
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.optimizer, self.scheduler = make_optimizer(train, self.trainable)
        self.train_model: torch.nn.Module = model
        """What the training forward goes through (a DDP wrapper or DeepSpeed's engine on N)."""
        self._good: list[torch.Tensor] | None = None

    # -- the step ---------------------------------------------------------------------------
    def step(
        self,
        loss: torch.Tensor,
        after_backward: Callable[[], None] = lambda: None,
        after_step: Callable[[], None] = lambda: None,
    ) -> float | None:
        """Backward, sync, clip and step on `loss`; None when the step was taken, else the
        non-finite value that made every rank skip it (gradients dropped, the last good weights
        restored). `after_backward` sees the gradients (SI), `after_step` the new weights with
        the gradients still there (SI's path integral, Reptile)."""
        if not self.ranks.all_true(bool(torch.isfinite(loss))):  # every rank skips, or none
            return self.skip(float(loss.detach()))
        self.backward(loss)
        after_backward()
        bad = self.clip_and_check()
        if bad is not None:
            return self.skip(bad)
        self.snapshot_good()  # these weights gave a finite loss: the state to fall back to
        self.optimizer.step()
        if getattr(self.optimizer, "overflow", False):  # DeepSpeed skipped a non-finite norm
            return self.skip(math.inf)
        self.scheduler.step()
        after_step()
        self.optimizer.zero_grad(set_to_none=True)
        return None

    def backward(self, loss: torch.Tensor) -> None:
        raise NotImplementedError

    def clip_and_check(self) -> float | None:
        """Clip the gradients (max_norm inf: the norm alone, so NaN never reaches Adam's
        moments); None if finite, else the norm."""
        norm = self.clip(self.trainable, self.train.grad_clip or math.inf)
        if not torch.isfinite(torch.as_tensor(norm)):
            self.optimizer.zero_grad(set_to_none=True)
            return float(norm)
        return None

    def clip(self, params, max_norm: float):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def skip(self, value: float) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        self.restore_good()
        return value

    # -- fall-back weights ------------------------------------------------------------------
    def snapshot_good(self) -> None:
        if self._good is None:
            self._good = [p.detach().clone() for p in self.trainable]
        else:
            for dst, p in zip(self._good, self.trainable, strict=True):
                dst.copy_(p.detach())

    def restore_good(self) -> None:
        if self._good is not None:
            with torch.no_grad():
                for p, src in zip(self.trainable, self._good, strict=True):
                    p.copy_(src)
            self.weights_written()

    def weights_written(self) -> None:
        """The trainable weights were written outside the optimizer (the fall-back, Reptile, a
        resume); engines that keep their own copy of them take it here."""

    # -- what trains changed ----------------------------------------------------------------
    def rebuild(self) -> None:
        """A fresh optimizer over what trains now: after the trainable adapter changed (grown,
        reused or merged). Adam moments of the previous adapter are dropped; the rate re-warms
        over `train.rewarm_steps` (0: at once)."""
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self._good = None
        self.optimizer, self.scheduler = make_optimizer(
            self.train, self.trainable, self.train.rewarm_steps
        )

    # -- state ------------------------------------------------------------------------------
    def optimizer_state(self) -> dict | None:
        """The optimizer's state dict on rank 0 (None elsewhere); every rank calls it."""
        return self.optimizer.state_dict() if self.ranks.main else None

    def partition(self) -> dict | None:
        """This rank's share of a partitioned optimizer state (None when it is not)."""
        return None

    def close(self) -> None:
        """Drop the training wrapper (a DDP reducer must not outlive its process group)."""
        self.train_model = self.model


class AccelerateEngine(Engine):
    """One process, or DDP on N: Accelerate prepares the model, optimizer and scheduler."""

    def __init__(self, train, model, ranks, accelerator) -> None:
        super().__init__(train, model, ranks)
        self.accelerator = accelerator
        self.prepare()

    def prepare(self) -> None:
        acc = self.accelerator
        self.train_model, self.optimizer, self.scheduler = acc.prepare(
            self.model, self.optimizer, self.scheduler
        )
        self.model = acc.unwrap_model(self.train_model)

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)  # DDP averages the gradients

    def clip(self, params, max_norm: float):
        return self.accelerator.clip_grad_norm_(params, max_norm)

    def rebuild(self) -> None:
        """Accelerate forgets the previous wrapper, optimizer and scheduler (`free_memory`),
        then prepares the new ones. DDP fixes the parameters it reduces when it wraps the
        model, so a change of what trains needs a new wrapper on every rank at the same step,
        and the old one must be gone: its hooks would still fire on a parameter that trains
        again. The new DDP wrapper broadcasts rank 0's parameters as it is built, so a fresh
        adapter (whose random initialisation draws from each rank's own RNG) starts equal on
        every rank."""
        stale = weakref.ref(self.train_model) if self.train_model is not self.model else None
        self.train_model = self.model
        self.optimizer = self.scheduler = None
        self.accelerator.free_memory()
        gc.collect()
        if stale is not None and stale() is not None:
            raise RuntimeError(
                "the previous DDP wrapper is still referenced after an adapter change; this is a "
                "bug in herllm, please report it"
            )
        super().rebuild()
        self.prepare()


class FSDPEngine(Engine):
    """The frozen base sharded with FSDP2 (herllm shards it; Accelerate stays out): the adapters
    are whole on every rank, so their gradients are averaged here after backward."""

    def __init__(self, train, model, ranks, accelerator) -> None:
        super().__init__(train, model, ranks)
        self.accelerator = accelerator

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)
        self.ranks.sync_grads(self.trainable)

    def rebuild(self) -> None:
        self.ranks.broadcast_trainable(self.model)  # no wrapper: the adapters are synced by hand
        super().rebuild()


class ZeroEngine(Engine):
    """DeepSpeed ZeRO-1/2 owns the adapters' optimizer state: it reduces into each rank's
    partition, clips in its step and skips a non-finite norm (`overflow`)."""

    def __init__(self, train, model, ranks, config: dict, keep_grads: bool) -> None:
        super().__init__(train, model, ranks)
        self.config, self.keep_grads = config, keep_grads
        self._wrap()

    def _wrap(self) -> None:
        self.optimizer = ZeroOptimizer(self.model, self.optimizer, self.config, self.keep_grads)
        self.train_model = self.optimizer.engine

    def backward(self, loss: torch.Tensor) -> None:
        self.optimizer.backward(loss)  # reduces into partitions; clipping is in its step

    def clip_and_check(self) -> float | None:
        if not self.optimizer.grads_finite():
            self.optimizer.discard()
            return math.inf
        return None

    def weights_written(self) -> None:
        self.optimizer.weights_written()  # into the engine's fp32 partitions

    def rebuild(self) -> None:
        self.optimizer.destroy()  # its gradient hooks would fire on a reused adapter
        super().rebuild()
        self._wrap()

    def optimizer_state(self) -> dict | None:
        state = self.optimizer.state_dict()  # a collective: the state is partitioned
        return state if self.ranks.main else None

    def partition(self) -> dict | None:
        return self.optimizer.partition()


def build_engine(train, model, ranks, accelerator, keep_grads: bool) -> Engine:
    """The engine the launch asked for (`Ranks` has read the launcher, `train.fsdp` and
    `train.deepspeed`). `keep_grads`: a regularizer reads each step's whole gradient (SI)."""
    if ranks.sharded:
        return FSDPEngine(train, model, ranks, accelerator)
    if ranks.zero is not None:
        return ZeroEngine(train, model, ranks, ranks.zero, keep_grads)
    return AccelerateEngine(train, model, ranks, accelerator)
