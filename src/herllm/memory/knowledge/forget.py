"""Forgetting reaches the weights: an item forgotten from the store loses its influence on the
adapter too, where a consolidation had absorbed it (`herllm knowledge forget --run`, the
server's `/v1/admin/forget`).

The only exact removal is a rollback: the adapter goes back to the weights saved before the
earliest consolidation still in it that absorbed any version of a forgotten item (and so past
every later consolidation too), then the other items those consolidations held, still active,
are consolidated again, scope by scope, through the same gate. What the learner trained since
that consolidation is undone as well, as any rollback undoes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from herllm.memory.knowledge.consolidate import (
    ConsolidationResult,
    consolidate,
    live_consolidations,
    rollback_consolidation,
)
from herllm.memory.knowledge.records import Item, Scope


@dataclass
class ForgetResult:
    """What forgetting did to the weights: the consolidations rolled back, and the ones made
    again from the items they held that are still active."""

    rolled_back: list[str]
    redone: list[ConsolidationResult]

    @property
    def changed(self) -> bool:
        return bool(self.rolled_back)


def absorbed_into(store, forgotten: Sequence[str]) -> set[str]:
    """The consolidation entries that absorbed any version of the ``forgotten`` items."""
    roots = {store.get(i).root_id for i in forgotten}
    return {it.consolidated_into for it in store.list(None, status=None)
            if it.root_id in roots and it.consolidated_into}  # fmt: skip


def forget_from_weights(model, tokenizer, store, forgotten: Sequence[str], *, run_dir,
                        retention=None, **kwargs) -> ForgetResult:  # fmt: skip
    """Remove the ``forgotten`` items' influence from ``model``'s adapter (module doc); call it
    after ``store.forget``. Nothing changes when no live consolidation absorbed them."""
    roots = {store.get(i).root_id for i in forgotten}
    hit = absorbed_into(store, forgotten)
    live = [r["entry"] for r in live_consolidations(run_dir)]
    first = next((e for e in live if e in hit), None)
    if first is None:
        return ForgetResult([], [])
    undone = live[live.index(first) :]
    items = rollback_consolidation(model, run_dir, first, store)
    keep: dict[Scope, list[Item]] = {}
    for item_id in items:
        it = store.get(item_id)
        if it.root_id not in roots and it.status == "active" and it.text:
            keep.setdefault(it.scope, []).append(it)
    redone = [consolidate(model, tokenizer, store, group, run_dir=run_dir, retention=retention,
                          **kwargs) for group in keep.values()]  # fmt: skip
    return ForgetResult(undone, redone)
