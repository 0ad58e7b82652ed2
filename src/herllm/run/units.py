"""Knowledge units: what happens at a detected shift, and the unit snapshots (see
`run.rollback` for going back to one).

At a shift the loop calls `close_unit`: measure the closing unit's own held-out loss (its
reservoir of samples) and re-measure every earlier unit's (stability), consolidate the
regularizers on a uniform sample of the closing unit, record the unit in the ledger, save the
adapters and trainer state under `units/<id>/`, and open the next unit.
"""

from __future__ import annotations

import shutil

import numpy as np
import torch

from herllm import atomic as ckpt
from herllm.acquire.chunks import to_batch
from herllm.models.load import ADAPTER_NAME
from herllm.refine.scoring import mean_nll
from herllm.run.adapters_io import save_adapters
from herllm.update import adapters as ad


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
    return float(np.mean([mean_nll(s.model, s.reservoir_batches(r))[0] for r in refs]))


def open_first_unit(s) -> None:
    s.ledger.open_unit(s.step, s.counters["tokens_streamed"], event=None)


def close_unit(s, event, new_windows=()) -> None:
    """Close the current unit at a detected shift and open the next one (see module doc).

    With expansion on, the closed unit's routing key is fitted and `new_windows` (the samples
    that raised the shift) decide whether the next unit reuses an adapter or grows one."""
    unit = s.ledger.current
    own = s.reservoir_batches(unit.reservoir)
    ref_loss = mean_nll(s.model, own)[0] if own else float("nan")
    stability = {  # 32 windows per earlier unit: the cost of a close stays flat as units add up
        uid: round(mean_nll(s.model, s.reservoir_batches(u["reference"][:32]))[0], 5)
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
    s.engine.rebuild()
    if s.protection.reptile is not None:
        s.protection.reptile.attach(s.model)  # Reptile interpolates within the adapter now training
    s.ledger.append({"type": "adapter", "action": action, "adapter": name, "previous": previous,
                     "distance_ratio": round(near, 4) if np.isfinite(near) else None, "step": step})  # fmt: skip
    s.log_event({"event": f"adapter_{action}", "adapter": name, "step": step})
    return name


def save_unit_snapshot(s, unit_id: str) -> None:
    """Adapters (PEFT format) and the trainer state as they were when the unit closed."""
    s.ranks.settle(s.model)  # FSDP: every rank frees its gathered weights before rank 0 saves
    # the registry's `snapshot` components; every rank takes part (DeepSpeed gathers the optimizer)
    state = {"step": s.step, **s.registry.state_dict(s.registry.names(snapshot=True))}
    if not s.accelerator.is_main_process:
        return
    root = s.run_dir / "units"
    tmp = root / f".tmp-{unit_id}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_adapters(s, tmp / "adapters")
    torch.save(state, tmp / "trainer.pt")
    ckpt.fsync_tree(tmp)
    final = root / unit_id
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
