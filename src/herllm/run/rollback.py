"""`herllm rollback RUN --to UNIT`: a new checkpoint whose knowledge is that of a closed unit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from herllm import atomic as ckpt
from herllm.errors import UserError
from herllm.memory.ledger import read_ledger
from herllm.memory.replay import ReplayBuffer
from herllm.run.lock import holding_run


@holding_run
def rollback(run_dir: str | Path, unit_id: str) -> Path:
    """Write a new checkpoint whose adapters and trainer state are those saved when `unit_id`
    closed; the stream position, buffer and counters stay where the run is (knowledge goes back,
    the data already read is not read again). Returns the new checkpoint directory."""
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
    for key, value in unit_state.items():  # the components a unit snapshot holds
        if key != "step":
            state[key] = value
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
