"""The same loop on N processes (HF Accelerate: DDP over gloo or NCCL, the frozen base sharded
with FSDP2, or the adapters' optimizer under DeepSpeed ZeRO-1/2: `herllm.parallel.zero`), and the checks
that keep the ranks together.

What each rank does, and what the ranks share (see docs/scaling.md):

- **Stream.** Rank r of N reads documents ``g`` with ``g % N == r`` (after a resume on another
  number of processes, the documents not yet learned are dealt that way: `Sharding`). Every rank
  lists the sources, but only its own documents are tokenized, scored and trained on: no
  document is learned twice.
- **Scores.** After each scoring pass the scored windows of all ranks are gathered, in stream
  order. Every rank then runs the same shift detector, selector, ledger and counters on the same
  data, so decisions that change the model or the loss (closing a unit, consolidating, growing
  or reusing an adapter, Reptile) happen on every rank at the same step (a change of what trains
  re-wraps the model in DDP: `Ranks.rewrap`). The discrete decisions themselves (a shift, grow
  or reuse, a unit's routing key) are taken on rank 0 and broadcast, so devices that round
  differently cannot split the ranks. Each rank keeps its own selected windows to train on.
- **Replay.** Rank 0 alone owns the SQLite buffer: it adds the gathered windows, draws
  ``k * N`` rows per step and sends each rank its ``k`` (one writer, no lock contention, nothing
  seen on another rank is lost). Refreshed replay scores are gathered back to rank 0.
- **Update.** The LM loss is per rank; DDP averages the gradients. With `train.fsdp` (or
  `accelerate launch --use_fsdp`) the base weights are sharded instead (`Ranks.shard_model`), the
  adapters stay whole on every rank and their gradients are averaged by `Ranks.sync_grads`;
  every forward pass is then a collective, so ranks run them in step (`forward_together`). With
  `train.deepspeed` (or `accelerate launch --use_deepspeed`) a DeepSpeed engine reduces the
  gradients into each rank's partition and steps its share of the adapters (`self.zero`). The
  magnitudes that set the penalty weights and the stability signals are averaged over ranks, so
  protection state stays identical everywhere.
- **Writes.** Rank 0 writes checkpoints, the ledger, metrics, events and the report. Each
  checkpoint stores every rank's stream position, pending windows and RNG state, and a digest of
  each rank's weights and protection state: ranks that differ stop the run.
- **End of a shard.** Shards can hold very different numbers of windows (documents differ in
  length). A rank whose shard is learned keeps stepping with the others on a placeholder whose
  loss counts zero, and gets no replay, while the active ranks scale their losses by N / active
  (`loss_scale`): the run ends when every rank's shard is learned.

With one process every method here is the identity, so a single-process run is unchanged.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from herllm.acquire.chunks import Experience, StreamPosition
from herllm.acquire.cursor import Sharding, load_shard_cursors, save_cursor, save_shard_cursors
from herllm.acquire.sources import Document
from herllm.errors import UserError
from herllm.refine.scoring import Scores, mean_nll

T = TypeVar("T")


# Where launchers put the number of processes: torchrun / accelerate launch / deepspeed, then MPI
# (the variables Accelerate itself reads).
LAUNCHER_WORLD_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def launched_processes(env: dict | None = None) -> tuple[str | None, int]:
    """The launcher's variable that holds the number of processes, and that number (1 when no
    launcher set one)."""
    env = os.environ if env is None else env
    var = next((v for v in LAUNCHER_WORLD_VARS if env.get(v)), None)
    return var, int(env[var]) if var else 1


def check_world_size(num_processes: int, env: dict | None = None) -> None:
    """Refuse a run whose launcher started more processes than Accelerate joined.

    On a CPU machine, `torchrun --nproc_per_node 2` with an Accelerator that is not told
    `cpu=True` gives every process a world of one: each trains alone, without any error.
    """
    var, launched = launched_processes(env)
    if launched != num_processes:
        raise UserError(
            f"the launcher started {launched} processes ({var}={launched}) but Accelerate "
            f"joined {num_processes}, so each rank would train alone; on a CPU-only machine "
            "Accelerate must be built with cpu=True (herllm does when CUDA is absent), so check "
            "the ACCELERATE_* and CUDA_VISIBLE_DEVICES variables, or launch with "
            f"`torchrun --nproc_per_node {launched} -m herllm.cli adapt ...`"
        )


def _env_flag(env, name: str) -> bool:
    return str(env.get(name, "false")).lower() in ("true", "1", "yes")


def fsdp_reshard(plugin, default: bool) -> bool:
    """`reshard_after_forward` for herllm's FSDP2 sharding, read from Accelerate's FSDP plugin
    (`accelerate launch --use_fsdp ...`); the options herllm cannot honour are refused."""
    if plugin is None:
        return default
    where = "in the Accelerate FSDP config"
    offload = plugin.cpu_offload  # FSDP1: CPUOffload(offload_params=...); FSDP2: a policy
    if (
        offload is True
        or getattr(offload, "offload_params", False)
        or (type(offload).__name__ == "CPUOffloadPolicy")
    ):
        raise UserError(f"FSDP CPU offload ({where}) is not supported by herllm; turn it off")
    if plugin.mixed_precision_policy is not None:
        raise UserError(
            f"FSDP mixed precision ({where}) is not supported by herllm, which trains in fp32; "
            "launch with --mixed_precision no"
        )
    if plugin.activation_checkpointing or plugin.ignored_modules:
        raise UserError(
            f"FSDP activation checkpointing and ignored modules ({where}) are not supported by "
            "herllm, which chooses what to shard itself (the LoRA adapters stay whole); turn them off"
        )
    reshard = plugin.reshard_after_forward
    if isinstance(reshard, bool):  # FSDP2
        return reshard
    strategy = reshard if reshard is not None else getattr(plugin, "sharding_strategy", None)
    if strategy is None:
        return default
    name = getattr(strategy, "name", str(strategy))  # FSDP1's sharding strategy
    if name in ("FULL_SHARD", "SHARD_GRAD_OP"):
        return name == "FULL_SHARD"
    raise UserError(
        f"FSDP sharding strategy {name} ({where}) is not supported by herllm; use FULL_SHARD "
        "or SHARD_GRAD_OP, or plain DDP (`accelerate launch --multi_gpu`) for no sharding"
    )


class Ranks:
    """This process's place among the N launched processes, and the collectives the loop uses."""

    def __init__(self, accelerator, train) -> None:
        """`train`: the run's `TrainConfig` (FSDP, DeepSpeed, batch size, clipping)."""
        from accelerate.utils import DistributedType

        from herllm.parallel import zero as zero

        check_world_size(accelerator.num_processes)
        self.accelerator = accelerator
        self.world = accelerator.num_processes
        self.rank = accelerator.process_index
        self.device = accelerator.device
        self.sharding = Sharding(self.world)
        """Which documents each rank reads (re-dealt when a run resumes on another N)."""
        self.active_ranks = list(range(self.world))
        """The ranks that train on new windows this step (not those whose shard is learned)."""
        # `accelerate launch --use_fsdp`: on GPUs Accelerate's state says FSDP; on a CPU machine
        # it says multi-CPU and only the launcher's variables tell (read them into a plugin)
        plugin = None
        if accelerator.distributed_type == DistributedType.FSDP:
            plugin = accelerator.state.fsdp_plugin
        elif _env_flag(os.environ, "ACCELERATE_USE_FSDP"):
            from accelerate.utils import FullyShardedDataParallelPlugin

            plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* variables
        self.sharded = self.world > 1 and (train.fsdp or plugin is not None)
        """The frozen base weights are sharded with FSDP2 (`shard_model`): every forward pass
        is then a collective, which all ranks must run together."""
        self.reshard = (
            fsdp_reshard(plugin, train.fsdp_reshard_after_forward) if self.sharded else True
        )
        ds_plugin = getattr(accelerator.state, "deepspeed_plugin", None)
        asked = zero.requested(accelerator.distributed_type, train.deepspeed, ds_plugin)
        self.zero: dict | None = None
        """The DeepSpeed ZeRO-1/2 config the adapters' optimizer runs under (`herllm.parallel.zero`)."""
        if asked is not None and self.world > 1:
            if self.sharded:
                raise UserError(
                    "both FSDP and DeepSpeed are asked for (train.fsdp / --use_fsdp and "
                    "train.deepspeed / --use_deepspeed); choose one"
                )
            self.zero = zero.zero_config(*asked, train.batch_size, train.grad_clip)
            try:
                import deepspeed  # noqa: F401
            except ImportError as e:
                raise UserError(
                    f"DeepSpeed is asked for ({asked[1]}) but is not installed ({e}); install it "
                    "after torch with `pip install 'herllm[deepspeed]'`, or launch without it"
                ) from e
        engine = "FSDP" if self.sharded else "DeepSpeed" if self.zero else None
        if engine and accelerator.mixed_precision != "no":
            raise UserError(
                f"mixed precision {accelerator.mixed_precision} is not supported with {engine} in "
                "herllm, which trains in fp32 (its model is not prepared by Accelerate, so the "
                "loss would be scaled and never unscaled); launch with --mixed_precision no"
            )

    @property
    def main(self) -> bool:
        return self.rank == 0

    # -- collectives ------------------------------------------------------------------------
    def _reduce(self, values: list[float], op) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t, op=op)
        return t.tolist()

    def any_true(self, flag: bool) -> bool:
        if self.world == 1:
            return bool(flag)
        return self._reduce([float(flag)], torch.distributed.ReduceOp.MAX)[0] > 0

    def all_true(self, flag: bool) -> bool:
        if self.world == 1:
            return bool(flag)
        return self._reduce([float(flag)], torch.distributed.ReduceOp.MIN)[0] > 0

    def sum(self, *values: float) -> list[float]:
        """Element-wise sums over ranks (exact for counts below 2**53)."""
        if self.world == 1:
            return list(values)
        return self._reduce(list(values), torch.distributed.ReduceOp.SUM)

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """Mean of a tensor over the active ranks (a detached copy; the identity on one
        process)."""
        if self.world == 1:
            return t
        flat = t.detach().reshape(-1) * float(self.active)
        out = torch.cat([flat, flat.new_tensor([float(self.active)])])
        torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.SUM)
        return (out[:-1] / out[-1].clamp_min(1)).view_as(t)

    @property
    def active(self) -> bool:
        """This rank trains on new windows this step."""
        return self.rank in self.active_ranks

    def set_active(self, active: bool) -> bool:
        """Record which ranks train on new windows this step (every rank calls it); whether
        any does."""
        self.active_ranks = [r for r, f in enumerate(self.gather(active)) if f]
        return bool(self.active_ranks)

    def loss_scale(self) -> float:
        """N / (active ranks) on an active rank, 0 on one whose shard has ended: DDP's (and
        `sync_grads`') mean over N ranks then averages the active ranks' gradients."""
        if self.world == 1:
            return 1.0
        return self.world / len(self.active_ranks) if self.active else 0.0

    def gather(self, obj: T) -> list[T]:
        """Every rank's object, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        out: list = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: T) -> T:
        """Rank 0's object on every rank."""
        if self.world == 1:
            return obj
        box = [obj if self.main else None]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run `fn` on rank 0 only (e.g. something that deletes files) and share its result."""
        return self.broadcast(fn() if self.main else None)

    # -- stream -----------------------------------------------------------------------------
    def shard(self, docs: Iterator[Document]) -> Iterator[Document]:
        """This rank's documents (`Sharding`: round robin over those not yet learned)."""
        if self.world == 1 and self.sharding.trivial():
            return docs
        return self.sharding.select(docs, self.rank)

    def global_index(self, local: int, rank: int) -> int:
        return self.sharding.global_of(local * self.world + rank)

    def gather_scored(
        self, windows: list[Experience], scores: Scores
    ) -> tuple[list[Experience], Scores, list[bool]]:
        """The scored windows of every rank, in stream order; `mine` marks this rank's own."""
        if self.world == 1:
            return windows, scores, [True] * len(windows)
        reps = scores.reps.numpy() if scores.reps is not None else None
        parts = self.gather(
            (windows, scores.nll.numpy(), scores.entropy.numpy(), reps, scores.tokens)
        )
        items = []
        for rank, (ws, nll, ent, rp, _) in enumerate(parts):
            for i, w in enumerate(ws):
                order = (self.global_index(w.doc_index, rank), w.offset)
                items.append((order, rank, w, nll[i], ent[i], None if rp is None else rp[i]))
        items.sort(key=lambda t: t[0])
        with_reps = bool(items) and all(t[5] is not None for t in items)
        merged = Scores(
            nll=torch.tensor(np.array([t[3] for t in items], dtype=np.float32)),
            entropy=torch.tensor(np.array([t[4] for t in items], dtype=np.float32)),
            reps=torch.from_numpy(np.stack([t[5] for t in items])) if with_reps else None,
            tokens=sum(p[4] for p in parts),
        )
        return [t[2] for t in items], merged, [t[1] == self.rank for t in items]

    # -- replay and general samples -----------------------------------------------------------
    def sample_replay(self, buffer, k: int) -> list:
        """k rows for this rank: rank 0 draws k rows per active rank and deals them out (none to
        a rank whose shard has ended)."""
        if k == 0:
            return []
        if self.world == 1:
            return buffer.sample(k) if buffer is not None and len(buffer) else []
        n = len(self.active_ranks)
        rows = buffer.sample(k * n) if buffer is not None and len(buffer) else []
        rows = self.broadcast(rows)
        return rows[self.active_ranks.index(self.rank) :: n] if self.active else []

    def sample_general(self, general, k: int) -> list[Experience]:
        """k general windows for this rank; every rank's sampler draws the same k per active
        rank, and the active ranks take turns."""
        if not k or general is None:
            return []
        n = len(self.active_ranks)
        drawn = general.sample(k * n)
        return drawn[self.active_ranks.index(self.rank) :: n] if self.active else []

    def update_scores(self, buffer, row_ids: list[int], scores: list[float]) -> None:
        """Refreshed replay scores of every rank, written by rank 0 (the buffer's one writer)."""
        if self.world > 1:
            parts = self.gather((row_ids, scores))
            row_ids = [i for ids, _ in parts for i in ids]
            scores = [v for _, vals in parts for v in vals]
        if buffer is not None:
            buffer.update_scores(row_ids, scores)

    def new_and_replay_loss(self, nll: torch.Tensor, n_new: int) -> tuple[float, float | None]:
        """Mean loss of the new and of the replayed samples of the global batch; nll (B,)."""
        new, old = nll[:n_new], nll[n_new:]
        if self.world == 1:
            return float(new.mean()), (float(old.mean()) if len(old) else None)
        s_new, n, s_old, m = self.sum(float(new.sum()), len(new), float(old.sum()), len(old))
        return s_new / max(n, 1), (s_old / m if m else None)

    # -- evaluation -------------------------------------------------------------------------
    def mean_nll(self, model, batches: list[dict]) -> float:
        """Token-weighted mean NLL over batches, each rank evaluating every world-th batch."""
        if self.world == 1:
            return mean_nll(model, batches)[0]
        mine = batches[self.rank :: self.world]
        mean, n = mean_nll(model, mine)
        if self.sharded and batches:  # every rank runs as many forward passes (collectives)
            mean_nll(model, batches[:1] * (-(-len(batches) // self.world) - len(mine)))
        total, count = self.sum(mean * n if n else 0.0, n)
        return total / count if count else math.nan

    # -- sharded base (FSDP2) ---------------------------------------------------------------
    def forward_together(self, mine: bool) -> bool:
        """Whether this rank runs a forward pass: when it has inputs, or, with a sharded base,
        when any rank has (the others then run one on a placeholder and drop it)."""
        return self.any_true(mine) if self.sharded else mine

    def shard_model(self, model: torch.nn.Module) -> dict:
        """Shard the frozen base weights of a PEFT model with FSDP2: each decoder layer (the
        classes the model lists in `_no_split_modules`) and then the whole model. The LoRA
        parameters, and those of adapters grown later, stay whole on every rank: they are small,
        and importances, anchors, Reptile and saving read them as plain tensors. Returns the
        number of base parameters and how many this rank holds."""
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import DTensor

        lora = {p for n, p in model.named_parameters() if "lora_" in n}
        with torch.no_grad():  # FSDP moves what it shards to the device, unit by unit; the
            for p in lora:  # adapters, which it leaves alone, are moved here
                p.data = p.data.to(self.device)
        kinds = set(getattr(model.get_base_model(), "_no_split_modules", None) or ())
        for module in [m for m in model.modules() if type(m).__name__ in kinds]:
            fully_shard(module, reshard_after_forward=self.reshard, ignored_params=lora)
        fully_shard(model, reshard_after_forward=self.reshard, ignored_params=lora)
        with torch.no_grad():  # FSDP initialises from the first forward, which must be the root's
            model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=self.device))
        sharded = [p for p in model.parameters() if isinstance(p, DTensor)]
        return {"base_params": sum(p.numel() for p in sharded),
                "local_params": sum(p.to_local().numel() for p in sharded)}  # fmt: skip

    def settle(self, model: torch.nn.Module) -> None:
        """Free the gathered weights of every FSDP unit, on every rank, before rank 0 alone
        reads the model's state dict (saving the adapters): FSDP's state-dict hook reshards what
        is still gathered (`reshard_after_forward=false`), and done on one rank only that would
        leave the ranks' next forward passes out of step."""
        if not self.sharded:
            return
        from torch.distributed.fsdp import FSDPModule

        for m in model.modules():
            if isinstance(m, FSDPModule):
                m.reshard()

    def sync_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Average the adapter gradients over ranks (with a sharded base, FSDP leaves the LoRA
        parameters alone; under DDP this is done by DDP itself)."""
        if not self.sharded:
            return
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
        flat /= self.world
        i = 0
        for g in grads:
            g.copy_(flat[i : i + g.numel()].view_as(g))
            i += g.numel()

    # -- checkpoints ------------------------------------------------------------------------
    def gather_rank_states(self, s) -> list[dict] | None:
        """Every rank's stream position, pending windows and RNG state (None on one process),
        after checking that the ranks hold the same weights and protection state."""
        if self.world == 1:
            return None
        from herllm import atomic as ckpt

        mine = {
            "position": asdict(s.packer.position),
            "pending": [vars(e) for e in s.pending],
            "stream_done": s.stream_done,
            "rng": ckpt.rng_state(),
            "digest": digest(s),
            "sharded": s.sharded,  # FSDP: base parameters in all, and on this rank
            "zero": s.optimizer.partition() if self.zero is not None else None,  # DeepSpeed
        }
        states = self.gather(mine)
        digests = [r["digest"] for r in states]
        if len(set(digests)) > 1:
            raise RuntimeError(
                f"ranks hold different weights or protection state at step {s.step} (digests "
                f"{[d[:12] for d in digests]}); this is a bug in herllm, please report it"
            )
        return states

    def save_cursor(self, path: Path, s, states: list[dict] | None) -> None:
        if states is None and self.sharding.trivial():
            save_cursor(s.packer.position, path, s.cfg.stream.sources)
        else:
            positions = [s.packer.position] if states is None else [
                StreamPosition(**r["position"]) for r in states
            ]  # fmt: skip
            save_shard_cursors(positions, self.sharding, path, s.cfg.stream.sources)

    def resume_rank(self, state: dict, cursor: Path, sources: list[str]) -> StreamPosition:
        """This rank's stream position; `state`'s pending windows, RNG and end-of-stream flag
        become this rank's own.

        Same number of processes: each rank continues exactly where it was. Another number M:
        the saved ranks' positions are re-dealt to the M ranks (`Sharding.redeal`): documents
        that any saved rank learned are skipped, each interrupted document resumes at its token
        offset on the rank it is dealt to, and the saved ranks' pending windows (selected, not
        yet trained) go to rank r % M. The order in which windows are learned differs from an
        uninterrupted run on either number of processes.
        """
        positions, sharding = load_shard_cursors(cursor, sources)
        saved = len(positions)
        if saved == self.world:
            self.sharding = sharding
            if "ranks" in state:
                mine = state["ranks"][self.rank]
                state.update(pending=mine["pending"], rng=mine["rng"],
                             stream_done=mine["stream_done"])  # fmt: skip
            return positions[self.rank]
        self.sharding = sharding.redeal(positions, self.world)
        ranks = state.get("ranks") or [
            {"pending": state["pending"], "rng": state["rng"], "stream_done": False}
        ]
        state["pending"] = [e for r, x in enumerate(ranks) if r % self.world == self.rank
                            for e in x["pending"]]  # fmt: skip
        state["rng"] = ranks[self.rank if self.rank < saved else 0]["rng"]
        state["stream_done"] = False  # a rank whose shard is empty finds out at its first read
        return StreamPosition()

    # -- what trains changed ----------------------------------------------------------------
    def rewrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """`model` as the training forward must see it after its trainable parameters changed
        (an adapter grown, reused or merged): the identity on one process, a new DDP wrapper on
        N. The caller has already dropped its reference to the previous wrapper.

        DDP fixes the set of parameters it reduces (its buckets and autograd hooks) when it
        wraps the model, so a change of what trains needs a new wrapper on every rank at the
        same step, and the old one must be gone: its hooks would still fire on a parameter that
        trains again. The trainable parameters are first broadcast from rank 0 (a fresh adapter's
        random initialisation draws from each rank's own RNG); the frozen base is identical on
        every rank already, so the wrapper skips DDP's broadcast of the whole model.
        """
        if self.world == 1:
            return model
        if self.sharded:  # no DDP wrapper: the adapters are whole on every rank, grads synced
            self.broadcast_trainable(model)
            return model
        import gc
        import weakref

        from torch.nn.parallel import DistributedDataParallel as DDP

        acc = self.accelerator

        def ddp(m) -> bool:  # also a DDP wrapper inside Accelerate's torch.compile wrapper
            return isinstance(getattr(m, "_orig_mod", m), DDP)

        stale = [weakref.ref(m) for m in acc._models if ddp(m)]
        acc._models = [m for m in acc._models if not ddp(m)]
        gc.collect()
        if any(ref() is not None for ref in stale):
            raise RuntimeError(
                "the previous DDP wrapper is still referenced after an adapter change; this is a "
                "bug in herllm, please report it"
            )
        self.broadcast_trainable(model)
        kwargs = acc.ddp_handler.to_kwargs() if acc.ddp_handler is not None else {}
        ids = [self.device.index] if self.device.type == "cuda" else None
        ddp = DDP(model, device_ids=ids, output_device=ids[0] if ids else None, init_sync=False,
                  **kwargs)  # fmt: skip
        if acc.ddp_handler is not None:
            acc.ddp_handler.register_comm_hook(ddp)
        ddp._is_accelerate_prepared = True
        acc._models.append(ddp)
        return ddp

    @torch.no_grad()
    def broadcast_trainable(self, model: torch.nn.Module) -> None:
        for p in model.parameters():
            if p.requires_grad:
                torch.distributed.broadcast(p.data, src=0)

    def close(self, s) -> None:
        """Release the DDP wrapper, wait for every rank, then leave the process group."""
        if self.world > 1 and torch.distributed.is_initialized():
            # A DDP reducer that outlives its process group can hang the process at exit.
            s.train_model = s.model
            self.accelerator.free_memory()  # drops Accelerate's references too, then collects
            self.accelerator.wait_for_everyone()
            torch.distributed.destroy_process_group()


def digest(s) -> str:
    """SHA-256 of the trainable weights and the protection state (ranks must agree on both)."""
    h = hashlib.sha256()
    for p in s.trainable:
        h.update(_bytes(p))
    _hash_tree(h, s.protection.state_dict())
    return h.hexdigest()


def _bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def _hash_tree(h, obj) -> None:
    if isinstance(obj, torch.Tensor):
        h.update(_bytes(obj))
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            h.update(str(k).encode())
            _hash_tree(h, obj[k])
    elif isinstance(obj, list | tuple):
        for v in obj:
            _hash_tree(h, v)
    else:
        h.update(repr(obj).encode())
