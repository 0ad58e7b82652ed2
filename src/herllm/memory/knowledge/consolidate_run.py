"""`herllm knowledge consolidate --run RUN`: consolidation into a run's adapter, as a checkpoint.

The run's newest checkpoint is loaded (as `herllm generate` loads it), the store's stable items
(``RUN/knowledge.sqlite``: active, not consolidated, retrieved at least ``min_retrievals``
times) are distilled into its adapter, gated on held-out general text (the bundled HER-Stream
``general`` train split), and an accepted consolidation becomes a new checkpoint (adapters
replaced, the ledger count taking in the consolidation record), so the next `herllm adapt`
resumes from it and `herllm generate` answers with it. ``undo`` restores the weights from
before an entry the same way.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from herllm.errors import UserError
from herllm.memory.knowledge.consolidate import (
    ConsolidationResult,
    consolidate,
    rollback_consolidation,
    stable_items,
)
from herllm.memory.knowledge.records import Scope
from herllm.memory.knowledge.store import KnowledgeStore
from herllm.run.lock import holding_run

STORE_FILE = "knowledge.sqlite"


def general_windows(tokenizer, windows: int, seq_len: int = 128) -> torch.Tensor:
    """The first ``windows`` windows of the bundled general text (train split), (W, T)."""
    from herllm.acquire.corpus import load_documents

    ids: list[int] = []
    for doc in load_documents("general", "train"):
        ids += tokenizer(doc, add_special_tokens=False)["input_ids"]
        if len(ids) >= windows * seq_len:
            break
    return torch.tensor(ids[: windows * seq_len]).view(-1, seq_len)


def general_batches(tokenizer, windows: int = 8, seq_len: int = 128) -> list[dict]:
    """Held-out general text for the gate, as LM batches."""
    x = general_windows(tokenizer, windows, seq_len)
    return [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()}]


def anchor_windows(tokenizer, windows: int = 64, gate: int = 8, seq_len: int = 128) -> list:
    """General windows for the anchor: the ones after the gate's, so the gate stays held out."""
    return general_windows(tokenizer, gate + windows, seq_len)[gate:].tolist()


def _load(run: Path):
    from herllm.infer.adapted import AdaptedModel

    adapted = AdaptedModel.from_run(run, knowledge=False)  # the store is opened by the caller
    if adapted.bank is not None:
        raise UserError(
            f"{run} grows a bank of routed adapters; consolidation into one of them is not "
            "supported yet: consolidate into a run with expand.grow=false"
        )
    for name, p in adapted.model.named_parameters():
        p.requires_grad_("lora_" in name)
    return adapted.model, adapted.tokenizer


def _checkpoint(run: Path, model) -> Path:
    """A new checkpoint: the newest one with the model's adapter in place of its own."""
    from herllm import atomic as ckpt
    from herllm.memory.ledger import count_lines
    from herllm.models.load import ADAPTER_NAME

    latest = max(dict(ckpt.list_checkpoints(run / "checkpoints")).items())[1]
    state = torch.load(latest / "trainer.pt", weights_only=False)
    state["step"] += 1
    if state.get("ledger") is not None:  # the consolidation record is part of this checkpoint
        state["ledger"]["count"] = count_lines(run / "ledger.jsonl")
    tmp = ckpt.begin(run / "checkpoints", state["step"])
    shutil.copytree(latest / "adapters", tmp / "adapters")
    model.save_pretrained(tmp / "adapters" / ADAPTER_NAME, selected_adapters=[ADAPTER_NAME])
    (tmp / "adapters" / ADAPTER_NAME / "README.md").unlink(missing_ok=True)
    shutil.copy2(latest / "cursor.json", tmp / "cursor.json")
    torch.save(state, tmp / "trainer.pt")
    final = ckpt.publish(tmp)
    if (run / "replay.sqlite").exists():  # the buffer's commit names the checkpoint to resume
        from herllm.memory.replay import ReplayBuffer

        buffer = ReplayBuffer.open(run / "replay.sqlite")
        buffer.commit(state["step"])
        buffer.close()
    return final


@holding_run
def consolidate_run(
    run_dir: str | Path, scope: Scope, *, min_retrievals: int = 1, **kwargs
) -> tuple[ConsolidationResult, Path | None]:
    """Consolidate a run's stable items into its adapter; returns the result and the new
    checkpoint (None when the gate rejected it)."""
    run = Path(run_dir)
    if not (run / STORE_FILE).is_file():
        raise UserError(f"no knowledge store at {run / STORE_FILE}: add to it first")
    model, tokenizer = _load(run)
    with KnowledgeStore(run / STORE_FILE, actor="consolidate") as store:
        items = stable_items(store, scope, min_retrievals=min_retrievals)
        if not items:
            raise UserError(
                f"no stable item in {scope} of {run}: none active, unconsolidated and retrieved "
                f">= {min_retrievals} times (lower --min-retrievals)"
            )
        retention = {"general": general_batches(tokenizer)}
        kwargs.setdefault("anchor", anchor_windows(tokenizer))
        result = consolidate(model, tokenizer, store, items, run_dir=run, retention=retention,
                             **kwargs)  # fmt: skip
    return result, (_checkpoint(run, model) if result.accepted else None)


@holding_run
def undo_run(run_dir: str | Path, entry: str) -> tuple[list[str], Path]:
    """Roll a run's adapter back to before consolidation ``entry``, as a new checkpoint."""
    run = Path(run_dir)
    model, _ = _load(run)
    with KnowledgeStore(run / STORE_FILE, actor="rollback") as store:
        items = rollback_consolidation(model, run, entry, store)
    return items, _checkpoint(run, model)


@holding_run
def forget_run(run_dir: str | Path, forgotten: list[str], **kwargs):
    """After ``store.forget`` of ``forgotten`` in a run's store: take their influence out of the
    run's adapter (`forget.forget_from_weights`), as a new checkpoint. Returns the
    `ForgetResult` and the checkpoint (None when no consolidation had absorbed them). A learner
    following the run must be stopped first: its next checkpoint would publish its own weights
    (the run's lock refuses while one runs, `run.lock`)."""
    from herllm.memory.knowledge.forget import ForgetResult, absorbed_into, forget_from_weights

    run = Path(run_dir)
    with KnowledgeStore(run / STORE_FILE, actor="forget") as store:
        if not absorbed_into(store, forgotten):
            return ForgetResult([], []), None
        model, tokenizer = _load(run)
        kwargs.setdefault("anchor", anchor_windows(tokenizer))
        result = forget_from_weights(model, tokenizer, store, forgotten, run_dir=run,
                                     retention={"general": general_batches(tokenizer)}, **kwargs)  # fmt: skip
    return result, _checkpoint(run, model)
