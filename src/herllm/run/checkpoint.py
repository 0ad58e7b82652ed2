"""Save and restore a run: the adapters (PEFT folders), the registry's components
(`trainer.pt`), the stream cursor (`cursor.json`), then the replay buffer's commit.

The files are written with the atomic protocol of `herllm.atomic` (temporary folder, fsync,
rename, buffer commit): a crash at any point leaves a consistent checkpoint to resume from.
"""

from __future__ import annotations

from dataclasses import asdict

import torch

from herllm import atomic
from herllm.acquire.chunks import Packer
from herllm.run.adapters_io import save_adapters
from herllm.run.state import RunState
from herllm.run.stateful import FORMAT


def save_checkpoint(s: RunState) -> None:
    """Write checkpoint step-N atomically, then commit the buffer with it."""
    if s.last_checkpoint == s.step:
        return
    root = s.run_dir / "checkpoints"
    ranks = gather_rank_states(s)  # N processes: every rank's cursor, pending, RNG, digest
    s.ranks.settle(s.model)  # FSDP: every rank frees its gathered weights before rank 0 saves
    state = s.registry.state_dict()  # every rank: gathering DeepSpeed's optimizer is a collective
    if s.accelerator.is_main_process:
        tmp = atomic.begin(root, s.step)
        save_adapters(s, tmp / "adapters")
        state = {"format": FORMAT, **state} | ({"ranks": ranks} if ranks else {})
        torch.save(state, tmp / "trainer.pt")
        s.ranks.save_cursor(tmp / "cursor.json", s.packer.position, s.cfg.stream.sources, ranks)
        atomic.publish(tmp)
        if s.buffer is not None:
            s.buffer.commit(s.step)
        atomic.prune(root, s.cfg.checkpoint.keep, s.buffer.committed_step if s.buffer else None)
    s.accelerator.wait_for_everyone()
    s.last_checkpoint = s.step


def gather_rank_states(s: RunState) -> list[dict] | None:
    """Every rank's per-rank components and stream position (None on one process), after
    checking that the ranks agree on the weights and the `digest` components."""
    if s.ranks.world == 1:
        return None
    mine = s.registry.state_dict(s.registry.names(per_rank=True)) | {
        "position": asdict(s.packer.position),
        "digest": s.ranks.digest(s.trainable, s.registry.state_dict(s.registry.names(digest=True))),
        "sharded": s.sharded,  # FSDP: base parameters in all, and on this rank
        "zero": s.engine.partition(),  # DeepSpeed: this rank's share of the optimizer state
    }
    return s.ranks.check_agree(s.ranks.gather(mine), s.step)


def load_checkpoint(s: RunState) -> None:
    """Restore the run from the checkpoint that the buffer committed (or the newest one)."""
    root = s.run_dir / "checkpoints"
    committed = s.buffer.committed_step if s.buffer else None  # rank 0 prunes, the others follow
    path = s.ranks.on_main(lambda: atomic.resume_point(root, committed))
    if path is None:
        return  # crashed before the first checkpoint: nothing was committed, start afresh
    state = torch.load(path / "trainer.pt", weights_only=False)
    # this rank's stream position; its pending windows, RNG and end-of-shard flag into `state`
    position = s.ranks.resume_rank(state, path / "cursor.json", s.cfg.stream.sources,
                                   s.registry.names(per_rank=True))  # fmt: skip
    weights = s.registry.entries["bank"].component
    weights.restore_from = path / "adapters"
    try:
        s.registry.load_state_dict(state, where=f"checkpoint {path}")
    finally:
        weights.restore_from = None
    s.packer = Packer(s.tokenizer, s.cfg.stream.seq_len, position,
                      s.ranks.sharding.offsets(s.ranks.rank), s.cfg.stream.chat_template)  # fmt: skip
    s.last_checkpoint = s.step
