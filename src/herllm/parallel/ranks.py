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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from herllm.acquire.chunks import Experience, StreamPosition
from herllm.acquire.cursor import Sharding, load_shard_cursors, save_cursor, save_shard_cursors
from herllm.acquire.sources import Document
from herllm.parallel import fsdp
from herllm.parallel.launch import read_launch
from herllm.refine.scoring import Scores, mean_nll

T = TypeVar("T")


# Where launchers put the number of processes: torchrun / accelerate launch / deepspeed, then MPI


class Ranks:
    """This process's place among the N launched processes, and the collectives the loop uses."""

    def __init__(self, accelerator, train) -> None:
        """`train`: the run's `TrainConfig` (FSDP, DeepSpeed, batch size, clipping)."""
        launch = read_launch(accelerator, train)  # refuses what herllm cannot run
        self.accelerator = accelerator
        self.world = accelerator.num_processes
        self.rank = accelerator.process_index
        self.device = accelerator.device
        self.sharding = Sharding(self.world)
        """Which documents each rank reads (re-dealt when a run resumes on another N)."""
        self.active_ranks = list(range(self.world))
        """The ranks that train on new windows this step (not those whose shard is learned)."""
        self.sharded = launch.sharded
        """The frozen base weights are sharded with FSDP2 (`parallel.fsdp`)."""
        self.reshard = launch.reshard
        self.zero = launch.zero
        """The DeepSpeed ZeRO-1/2 config the adapters' optimizer runs under, or None."""

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
            base=scores.base,  # every rank scores with the same settings
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
        """Shard the frozen base with FSDP2 (`parallel.fsdp.shard_model`)."""
        return fsdp.shard_model(model, self.device, self.reshard)

    def settle(self, model: torch.nn.Module) -> None:
        """FSDP: every rank frees its gathered weights before rank 0 alone saves."""
        if self.sharded:
            fsdp.settle(model)

    def sync_grads(self, params: list[torch.nn.Parameter]) -> None:
        """FSDP: average the whole adapters' gradients over ranks (DDP does it itself)."""
        if self.sharded:
            fsdp.sync_grads(params, self.world)

    # -- checkpoints ------------------------------------------------------------------------
    def check_agree(self, states: list[dict], step: int) -> list[dict]:
        """Every rank's state (`run.checkpoint.gather_rank_states`), after checking that their
        digests agree: ranks that hold different weights or protection state stop the run."""
        digests = [r["digest"] for r in states]
        if len(set(digests)) > 1:
            raise RuntimeError(
                f"ranks hold different weights or protection state at step {step} (digests "
                f"{[d[:12] for d in digests]}); this is a bug in herllm, please report it"
            )
        return states

    def digest(self, params: list[torch.nn.Parameter], tree) -> str:
        """SHA-256 of the trainable weights and of a state tree (ranks must agree on both)."""
        h = hashlib.sha256()
        for p in params:
            h.update(_bytes(p))
        _hash_tree(h, tree)
        return h.hexdigest()

    def save_cursor(
        self, path: Path, position: StreamPosition, sources: list[str], states: list[dict] | None
    ) -> None:
        if states is None and self.sharding.trivial():
            save_cursor(position, path, sources)
        else:
            positions = [position] if states is None else [
                StreamPosition(**r["position"]) for r in states
            ]  # fmt: skip
            save_shard_cursors(positions, self.sharding, path, sources)

    def resume_rank(
        self, state: dict, cursor: Path, sources: list[str], per_rank: list[str]
    ) -> StreamPosition:
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
            if "ranks" in state:  # `per_rank`: the registry's components each rank has its own of
                mine = state["ranks"][self.rank]
                state.update({k: mine[k] for k in per_rank})
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

    @torch.no_grad()
    def broadcast_trainable(self, model: torch.nn.Module) -> None:
        for p in model.parameters():
            if p.requires_grad:
                torch.distributed.broadcast(p.data, src=0)

    def close(self, engine) -> None:
        """Release the training wrapper, wait for every rank, then leave the process group."""
        if self.world > 1 and torch.distributed.is_initialized():
            # A DDP reducer that outlives its process group can hang the process at exit.
            engine.close()
            self.accelerator.free_memory()  # drops Accelerate's references too, then collects
            self.accelerator.wait_for_everyone()
            torch.distributed.destroy_process_group()


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
