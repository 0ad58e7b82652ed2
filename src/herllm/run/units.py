"""Knowledge units: what happens at a detected shift, and the unit snapshots (see
`run.rollback` for going back to one).

At a shift the loop calls `close_unit`: measure the closing unit's own held-out loss (its
reservoir of samples) and re-measure every earlier unit's (stability), consolidate the
regularizers on a uniform sample of the closing unit, record the unit in the ledger, save the
adapters and trainer state under `units/<id>/`, and open the next unit.
"""

from __future__ import annotations

import shutil
from contextlib import contextmanager

import numpy as np
import torch

from herllm import atomic as ckpt
from herllm.models.load import ADAPTER_NAME
from herllm.refine.scoring import batch_nll, mean_nll
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


@contextmanager
def nll_tap(model, batches: list[dict]):
    """While open: `batch_nll` of each of `batches` that `model` runs forward on as it is (eval
    mode, adapters on, those very input tensors), by batch index.

    The importance pass at a close runs the model forward on the first batches of the unit's
    sample, with the weights the unit's held-out loss is measured with (consolidating changes
    no weight): the loss of those batches is read from its logits, not from a second forward.
    A pass that runs other inputs (per-sample slices) or another model leaves them to measure."""
    peft = getattr(model, "module", model)
    index = {id(b["input_ids"]): i for i, b in enumerate(batches)}
    layers = ad.lora_layers(peft)
    seen: dict[int, tuple[float, int]] = {}

    def record(module, _args, kwargs, out) -> None:
        ids = kwargs.get("input_ids")
        i = index.get(id(ids))
        if i is None or i in seen or batches[i]["input_ids"] is not ids or module.training:
            return
        if kwargs.get("adapter_names") is not None or any(m.disable_adapters for m in layers):
            return  # not the model the held-out loss is measured with
        with torch.no_grad():
            seen[i] = batch_nll(out.logits.detach(), batches[i]["labels"])

    handle = peft.register_forward_hook(record, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


def open_first_unit(s) -> None:
    s.ledger.open_unit(s.step, s.counters["tokens_streamed"], event=None)


def close_unit(s, event, new_windows=(), new_reps=None) -> None:
    """Close the current unit at a detected shift and open the next one (see module doc).

    With expansion on, the closed unit's routing key is fitted and `new_windows` (the samples
    that raised the shift) decide whether the next unit reuses an adapter or grows one. Both use
    base representations the scoring pass already computed where there are any (`new_reps`
    (B, H) for the new windows, the reservoir's kept ones for the unit's); a base pass makes
    the others."""
    unit = s.ledger.current
    own = s.reservoir_batches(unit.reservoir)
    stability = {  # 32 windows per earlier unit: the cost of a close stays flat as units add up
        uid: round(mean_nll(s.model, s.reservoir_batches(u["reference"][:32]))[0], 5)
        for uid, u in s.ledger.closed.items()
        if u["reference"]
    }
    measured = {}
    if s.protection.regs and own:  # importances: one backward pass per sample, so a capped few
        with nll_tap(s.model, own) as measured:  # their forward is the held-out loss's as well
            s.protection.consolidate(s.model, own[: s.cfg.protect.consolidate_batches])
        s.counters["consolidations"] += 1
    ref_loss = mean_nll(s.model, own, known=measured)[0] if own else float("nan")
    tokens = s.counters["tokens_streamed"]
    trained = s.bank.current if s.bank is not None else ADAPTER_NAME
    spill, spill_reps = [], []
    if s.bank is not None:
        # the key covers the unit's own region: windows read from the estimated change point on
        # belong to the next region (detection lags); they help decide where that region goes
        start = min(event.sample_index, event.change_index)
        (mine, spill), (mine_reps, spill_reps) = unit.split_at(start), unit.split_reps_at(start)
        if len(mine) < 8:
            mine, mine_reps = unit.reservoir, unit.reservoir_reps
        key = s.ranks.broadcast(s.unit_key(unit.id, mine, mine_reps))
        if key is not None:
            s.bank.add_key(key)
    s.ledger.close_unit(s.step, tokens, [trained], ref_loss, stability)
    save_unit_snapshot(s, unit.id)
    record = {k: (v.item() if hasattr(v, "item") else v) for k, v in vars(event).items()}
    if s.bank is not None and new_windows:
        windows = [(w.input_ids[: w.n_tokens], w.loss_mask[: w.n_tokens]) for w in new_windows]
        reps = [None] * len(windows) if new_reps is None else list(np.asarray(new_reps))
        choose_adapter(s, windows + spill, reps + spill_reps)
    s.ledger.open_unit(s.step, tokens, event=record)
    s.counters["shifts"] += 1
    s.log_event({"event": "shift", "step": s.step, "closed": unit.id, **record})


def choose_adapter(s, windows, reps=None) -> str:
    """Reuse the adapter of the unit the new region (`windows`: token ids, loss mask) lies near,
    or grow one (merging the two closest adapters first when the cap is reached); every change
    goes to the ledger. `reps`: the windows' base representations where known (None: computed)."""
    bank = s.bank
    reps = s.window_reps(windows, reps)  # (N, H)
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
