"""Knowledge units: what happens at a detected shift, snapshots, and rollback.

At a shift the loop calls `close_unit`: measure the closing unit's own held-out loss (its
reservoir of samples) and re-measure every earlier unit's (stability), consolidate the
regularizers on a uniform sample of the closing unit, record the unit in the ledger, save the
adapters and trainer state under `units/<id>/`, and open the next unit.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

from herllm import atomic as ckpt
from herllm.errors import UserError
from herllm.models.load import ADAPTER_NAME
from herllm.refine.scoring import mean_nll


def reservoir_batches(
    s, reservoir: list[tuple[np.ndarray, np.ndarray]], batch_size: int = 8
) -> list[dict]:
    """A unit's reservoir windows as padded model batches on the device."""
    from herllm.acquire.chunks import window_batches

    return window_batches(
        reservoir, s.cfg.stream.seq_len, s.packer.pad_id, s.accelerator.device, batch_size
    )


def earlier_units_loss(s, units: int = 4, windows: int = 8) -> float | None:
    """Mean loss on a few samples of the latest closed units (None before any unit closed).

    This is the forgetting signal of the dynamic strength: it rises when earlier knowledge is
    being overwritten. A few windows of the last few units keep it cheap.
    """
    refs = [
        u["reference"][:windows] for u in list(s.ledger.closed.values())[-units:] if u["reference"]
    ]
    if not refs:
        return None
    return float(np.mean([mean_nll(s.model, reservoir_batches(s, r))[0] for r in refs]))


def open_first_unit(s) -> None:
    s.ledger.open_unit(s.step, s.counters["tokens_streamed"], event=None)


def close_unit(s, event, new_windows=()) -> None:
    """Close the current unit at a detected shift and open the next one (see module doc).

    With expansion on, the closed unit's routing key is fitted and `new_windows` (the samples
    that raised the shift) decide whether the next unit reuses an adapter or grows one."""
    unit = s.ledger.current
    own = reservoir_batches(s, unit.reservoir)
    ref_loss = mean_nll(s.model, own)[0] if own else float("nan")
    stability = {  # 32 windows per earlier unit: the cost of a close stays flat as units add up
        uid: round(mean_nll(s.model, reservoir_batches(s, u["reference"][:32]))[0], 5)
        for uid, u in s.ledger.closed.items()
        if u["reference"]
    }
    if s.protection.regs and own:  # importances: one backward pass per sample, so a capped few
        s.protection.consolidate(s.model, own[: s.cfg.protect.consolidate_batches])
        s.counters["consolidations"] += 1
    tokens = s.counters["tokens_streamed"]
    trained = s.bank.current if s.bank is not None else ADAPTER_NAME
    spill = []
    if s.bank is not None:
        # the key covers the unit's own region: windows read from the estimated change point on
        # belong to the next region (detection lags); they help decide where that region goes
        own, spill = unit.split_at(min(event.sample_index, event.change_index))
        key = s.ranks.broadcast(s.unit_key(unit.id, own if len(own) >= 8 else unit.reservoir))
        if key is not None:
            s.bank.add_key(key)
    s.ledger.close_unit(s.step, tokens, [trained], ref_loss, stability)
    save_unit_snapshot(s, unit.id)
    record = {k: (v.item() if hasattr(v, "item") else v) for k, v in vars(event).items()}
    if s.bank is not None and new_windows:
        choose_adapter(s, list(new_windows) + [s.window_to_experience(i, m) for i, m in spill])
    s.ledger.open_unit(s.step, tokens, event=record)
    s.counters["shifts"] += 1
    s.log_event({"event": "shift", "step": s.step, "closed": unit.id, **record})


def choose_adapter(s, new_windows) -> str:
    """Reuse the adapter of the unit the new region lies near, or grow one (merging the two
    closest adapters first when the cap is reached); every change goes to the ledger."""
    from herllm.acquire.chunks import to_batch
    from herllm.update import adapters as ad

    bank = s.bank
    reps = ad.base_reps(s.model, [s.to_device(to_batch(list(new_windows)))]).numpy()
    reuse, near = s.ranks.broadcast(bank.decide(reps))  # rank 0 decides for every rank
    step = s.step
    if reuse is not None:
        action, name = "reuse", reuse
    else:
        if len(bank.adapters) >= bank.max_adapters:
            a, b = bank.closest_pair()
            merged = f"m{bank.merged + 1:03d}"
            ad.merge_adapters(s.model, a, b, merged)
            units = bank.adapters.pop(a)["units"] + bank.adapters.pop(b)["units"]
            bank.register(merged, step, units)
            for key in bank.keys.values():
                key.adapter = merged if key.adapter in (a, b) else key.adapter
            bank.merged += 1
            if bank.current in (a, b):
                bank.current = merged
            s.ledger.append({"type": "adapter", "action": "merge", "adapters": [a, b],
                             "into": merged, "units": units, "step": step})  # fmt: skip
        bank.grown += 1
        name = f"a{bank.grown:03d}"
        ad.add_adapter(s.model, name, ad.fresh_config(s.model, s.cfg.lora))
        if s.cfg.expand.init == "current":
            ad.copy_adapter(s.model, bank.current, name)
        bank.register(name, step)
        action = "grow"
    previous = bank.current
    bank.current = name
    ad.activate(s.model, bank)
    s.rebuild_optimizer()
    if s.protection.reptile is not None:
        s.protection.reptile.attach(s.model)  # Reptile interpolates within the adapter now training
    s.ledger.append({"type": "adapter", "action": action, "adapter": name, "previous": previous,
                     "distance_ratio": round(near, 4) if np.isfinite(near) else None, "step": step})  # fmt: skip
    s.log_event({"event": f"adapter_{action}", "adapter": name, "step": step})
    return name


def save_unit_snapshot(s, unit_id: str) -> None:
    """Adapters (PEFT format) and the trainer state as they were when the unit closed."""
    s.ranks.settle(s.model)  # FSDP: every rank frees its gathered weights before rank 0 saves
    optimizer = s.optimizer_state()  # every rank takes part (DeepSpeed gathers it)
    if not s.accelerator.is_main_process:
        return
    root = s.run_dir / "units"
    tmp = root / f".tmp-{unit_id}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    from herllm.run.state import save_adapters

    save_adapters(s, tmp / "adapters")
    torch.save({"step": s.step, "optimizer": optimizer, "scheduler": s.scheduler.state_dict(),
                "protection": s.protection.state_dict(),
                "bank": s.bank.state_dict() if s.bank is not None else None}, tmp / "trainer.pt")  # fmt: skip
    ckpt.fsync_tree(tmp)
    final = root / unit_id
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)


def rollback(run_dir: str | Path, unit_id: str) -> Path:
    """Write a new checkpoint whose adapters and trainer state are those saved when `unit_id`
    closed; the stream position, buffer and counters stay where the run is (knowledge goes back,
    the data already read is not read again). Returns the new checkpoint directory."""
    from herllm.memory.ledger import read_ledger
    from herllm.memory.replay import ReplayBuffer

    run = Path(run_dir)
    closed = {r["unit"]: r for r in read_ledger(run) if r["type"] == "close"}
    if unit_id not in closed:
        raise UserError(
            f"unit {unit_id!r} has not closed in {run}; closed units: {', '.join(closed) or 'none'}"
        )
    snap = run / closed[unit_id]["snapshot"]
    if not (snap / "trainer.pt").is_file():
        raise UserError(f"snapshot {snap} is missing; the run directory was edited by hand")
    buffer = ReplayBuffer.open(run / "replay.sqlite") if (run / "replay.sqlite").exists() else None
    latest = ckpt.resume_point(run / "checkpoints", buffer.committed_step if buffer else None)
    if latest is None:
        raise UserError(f"{run} has no checkpoint to roll back from")
    state = torch.load(latest / "trainer.pt", weights_only=False)
    unit_state = torch.load(snap / "trainer.pt", weights_only=False)
    for key in ("optimizer", "scheduler", "protection", "bank"):
        if key in unit_state:
            state[key] = unit_state[key]
    state["step"] += 1  # a rollback takes a step number, so the buffer can commit with it
    state["rolled_back_to"] = unit_id
    state["ledger"]["count"] += 1  # the rollback record below is part of this checkpoint
    tmp = ckpt.begin(run / "checkpoints", state["step"])
    shutil.copytree(snap / "adapters", tmp / "adapters")
    shutil.copy2(latest / "cursor.json", tmp / "cursor.json")
    torch.save(state, tmp / "trainer.pt")
    final = ckpt.publish(tmp)
    record = {
        "type": "rollback",
        "to": unit_id,
        "step": state["step"],
        "from_step": state["step"] - 1,
    }
    with open(run / "ledger.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")
    if buffer is not None:  # the commit makes the rollback checkpoint the one to resume from
        buffer.commit(state["step"])
        buffer.close()
    return final
