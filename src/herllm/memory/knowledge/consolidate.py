"""Consolidation: distil stable knowledge items into the adapter (prompt distillation).

For each item the TEACHER is the model as it is now (its adapter included, so earlier
consolidations are kept) with the item's passage in its context; the STUDENT is the same model
without the passage. Both read texts about the item (``distil.py``: continuations of the
passage's sentences, the passage itself and its sentences reordered, the teacher's own rewrites);
the student is trained into the LoRA adapter for a few passes to match the teacher's next-token
distributions over them:

    loss = KL(teacher || student) over the teacher's top-k tokens and one bucket for the rest

(a 49k vocabulary stays cheap: k log-probs per position are kept, not the full rows). General
``anchor`` windows, whose teacher is the model before the consolidation, are mixed into the
batches so that general text stays where it was.

Earlier consolidations: each accepted one keeps up to 48 of its samples (with their teacher's
top-k) in its snapshot folder. A quarter of them CHECK that its facts are still held, the rest
are REPLAYED beside later consolidations' samples (about ``replay_share`` of their tokens), so
what was distilled before keeps being trained toward the teacher it had.

Gate: held-out general text (``retention``, token-weighted NLL) and the earlier consolidations'
check samples (KL to their teachers) are measured before and after. The consolidation is rejected,
and the adapter weights restored exactly, when a general set's NLL rises by more than
``tolerance`` (relative), or when the earlier check KL rises by more than ``1 - earlier_keep`` of
what those consolidations still hold (their KL before they were learned minus the KL now; at
least a tenth of the former). An accepted one is a ledger entry (``RUN/ledger.jsonl``, type
``consolidation``) with the adapter weights before and after it (``RUN/consolidations/<entry>/``),
so :func:`rollback_consolidation` restores them bit-exactly; its items are marked with
``store.set_consolidated(item_id, entry)``.

This lives beside the store (not in ``update/``) because it is the store's last step: it reads
items, marks them and uses the store's prompt format; it needs only ``models/`` and PEFT's
LoRA, not the learner. :func:`finetune_passages` is the plain fine-tuning to compare with.
"""

from __future__ import annotations

import json
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from herllm.errors import UserError
from herllm.memory.knowledge.distil import (
    Sample,
    anchor_samples,
    batch_kl,
    encode,
    load_samples,
    pad_right,
    sample_kls,
    save_samples,
    student_kl,
    teacher_samples,
)
from herllm.memory.knowledge.records import Item

# ---- adapter weights -------------------------------------------------------------------------


def adapter_state(model) -> dict[str, torch.Tensor]:
    """Copies of the trainable (adapter) weights, by parameter name."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_adapter_state(model, state: dict[str, torch.Tensor]) -> None:
    """Copy saved adapter weights back in place (bit-exact)."""
    params = dict(model.named_parameters())
    missing = [n for n in state if n not in params]
    if missing:
        raise UserError(f"adapter snapshot does not match the model: no parameter {missing[0]}")
    with torch.no_grad():
        for n, v in state.items():
            params[n].copy_(v.to(params[n].device))


def _trainable(model) -> list[torch.nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UserError("consolidation needs a model with a trainable LoRA adapter (attach_lora)")
    return params


@torch.no_grad()
def retention_nll(model, batches: list[dict]) -> float:
    """Token-weighted mean NLL of ``batches`` (input_ids, attention_mask, labels)."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for b in batches:
        logits = model(input_ids=b["input_ids"].to(model.device),
                       attention_mask=b["attention_mask"].to(model.device)).logits  # fmt: skip
        labels = b["labels"].to(model.device)[:, 1:]  # (B, T-1)
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(),
                              ignore_index=-100, reduction="sum")  # fmt: skip
        total, count = total + float(nll), count + int((labels != -100).sum())
    model.train(was)
    return total / count if count else float("nan")


# ---- consolidation ---------------------------------------------------------------------------


@dataclass
class ConsolidationResult:
    entry: str | None
    """Ledger entry id (None when rejected)."""
    accepted: bool
    items: list[str]
    kl_before: float
    kl_after: float
    retention_before: dict[str, float]
    retention_after: dict[str, float]
    tokens_trained: int
    seconds: float
    reason: str | None = None
    samples: list[Sample] = field(default_factory=list, repr=False)


def _take(rows: Sequence, tokens: float) -> list:
    """The first ``rows`` (token-id rows or samples) until they hold ``tokens`` tokens (the one
    that crosses included)."""
    out, have = [], 0
    for r in rows:
        if have >= tokens:
            break
        out.append(r)
        have += len(r.student_ids if isinstance(r, Sample) else r)
    return out


KEPT = 48
"""Samples of each accepted consolidation kept for later ones (every 4th checks, the rest replay)."""


def _kept(n: int) -> list[int]:
    """Indices of up to KEPT of ``n`` samples, evenly spread."""
    return list(range(0, n, max(1, n // KEPT)))[:KEPT]


def _split(kept: Sequence[Sample]) -> tuple[list[Sample], list[Sample]]:
    """Kept samples as (check, replay): every 4th checks."""
    return list(kept[::4]), [s for i, s in enumerate(kept) if i % 4]


def earlier_samples(run_dir: str | Path) -> tuple[list[Sample], float, list[Sample]]:
    """Of the consolidations still in the adapter: their check samples, the check samples' mean
    KL before they were learned, and their replay samples."""
    run, check, replay, unlearned = Path(run_dir), [], [], 0.0
    for r in live_consolidations(run):
        path = run / r["snapshot"] / "samples.safetensors"
        if path.is_file():  # consolidations recorded before samples were kept have none
            samples, meta = load_samples(path)
            c, rest = _split(samples)
            check, replay = check + c, replay + rest
            unlearned += float(meta["check_kl"]) * len(c)
    return check, unlearned / max(len(check), 1), replay


def _entry_id(run_dir: Path) -> str:
    ledger = run_dir / "ledger.jsonl"
    lines = ledger.read_text(encoding="utf-8").splitlines() if ledger.is_file() else []
    n = sum(1 for line in lines if '"type": "consolidation"' in line)
    return f"cons-{n + 1:04d}"


def consolidate(
    model,
    tokenizer,
    store,
    items: Sequence[Item],
    *,
    run_dir: str | Path,
    passes: int = 4,
    lr: float = 1e-3,
    batch_size: int = 8,
    prompts: int = 8,
    new_tokens: int = 32,
    whole: bool = True,
    shuffles: int = 2,
    rewrites: int = 4,
    rewrite_tokens: int = 160,
    topk: int = 32,
    sample: bool = False,
    anchor: Sequence[Sequence[int]] = (),
    anchor_share: float = 0.3,
    replay_share: float = 0.3,
    retention: dict[str, list[dict]] | None = None,
    tolerance: float = 0.02,
    earlier_keep: float = 0.9,
    seed: int = 0,
    actor: str = "consolidate",
) -> ConsolidationResult:
    """Distil ``items`` into ``model``'s trainable adapter (module doc); returns what happened.
    ``prompts`` .. ``rewrite_tokens``: the texts about each item (``distil.teacher_samples``);
    ``anchor``: general-text windows (token ids) trained toward the model as it is now, beside
    the items' samples: a seeded random draw of them with about ``anchor_share`` of the items'
    tokens (all of them at most); ``replay_share``: of earlier consolidations' kept samples,
    about this share of the items' tokens is trained on too; ``retention``: named held-out general batch
    lists (input_ids, attention_mask, labels) for the gate (keep them apart from ``anchor``);
    ``earlier_keep``: share of what earlier consolidations hold that the gate requires kept."""
    start, run = time.perf_counter(), Path(run_dir)
    params, pad = _trainable(model), tokenizer.pad_token_id
    samples = [s for j, it in enumerate(items) if it.text
               for s in teacher_samples(model, tokenizer, it.text, prompts=prompts,
                                        new_tokens=new_tokens, whole=whole, shuffles=shuffles,
                                        rewrites_n=rewrites, rewrite_tokens=rewrite_tokens,
                                        topk=topk, sample=sample, seed=seed + 1000 * j)]  # fmt: skip
    if not samples:
        raise UserError("nothing to consolidate: the items have no text (forgotten?)")
    own = sum(len(s.student_ids) for s in samples)  # the items' tokens
    rng = random.Random(seed)
    check, unlearned, replay = earlier_samples(run)
    anchor = list(anchor)
    rng.shuffle(anchor)  # a different part of the general text each consolidation
    rng.shuffle(replay)
    pool: list[Sample] = (samples + anchor_samples(model, _take(anchor, anchor_share * own), topk)
                          + _take(replay, replay_share * own))  # fmt: skip
    before = adapter_state(model)
    ret_before = {k: retention_nll(model, b) for k, b in (retention or {}).items()}
    kls = sample_kls(model, samples, pad, batch_size)
    kl_before, keep = sum(kls) / len(kls), _kept(len(samples))
    check_kl = statistics.mean(kls[i] for i in keep[::4])  # _split's checks, for later gates
    if check:
        ret_before["earlier_kl"] = student_kl(model, check, pad, batch_size)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    tokens = 0
    model.train()
    for _ in range(passes):  # a few passes over the teacher's samples (and the anchor's)
        order = list(range(len(pool)))
        rng.shuffle(order)  # then batches of similar lengths (little padding), in random order
        order.sort(key=lambda j: len(pool[j].student_ids))
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        rng.shuffle(batches)
        for batch in batches:
            chunk = [pool[j] for j in batch]
            loss = batch_kl(model, chunk, pad)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            tokens += sum(len(s.student_ids) for s in chunk)
    model.eval()
    kl_after = student_kl(model, samples, pad, batch_size)
    ret_after = {k: retention_nll(model, b) for k, b in (retention or {}).items()}
    hurt = [f"{k} NLL {ret_before[k]:.4f} -> {ret_after[k]:.4f} (over +{tolerance:.0%})"
            for k in ret_after if ret_after[k] > ret_before[k] * (1.0 + tolerance)]  # fmt: skip
    if check:
        ret_after["earlier_kl"] = student_kl(model, check, pad, batch_size)
        held = max(unlearned - ret_before["earlier_kl"], 0.1 * unlearned)
        if ret_after["earlier_kl"] - ret_before["earlier_kl"] > (1.0 - earlier_keep) * held:
            hurt.append(f"earlier consolidations' KL {ret_before['earlier_kl']:.4f} -> "
                        f"{ret_after['earlier_kl']:.4f} (they hold {held:.4f} of "
                        f"{unlearned:.4f}; keep {earlier_keep:.0%})")  # fmt: skip
    ids = [it.id for it in items if it.text]
    result = ConsolidationResult(None, not hurt, ids, kl_before, kl_after, ret_before, ret_after,
                                 tokens, 0.0, samples=samples)  # fmt: skip
    if hurt:
        load_adapter_state(model, before)
        result.reason = "; ".join(hurt)
    else:
        result.entry = _record(run, before, adapter_state(model), result, store, actor)
        save_samples(run / "consolidations" / result.entry / "samples.safetensors",
                     [samples[i] for i in keep], {"check_kl": repr(check_kl)})  # fmt: skip
    result.seconds = time.perf_counter() - start
    return result


def _record(run: Path, before, after, result: ConsolidationResult, store, actor: str) -> str:
    entry = _entry_id(run)
    snap = run / "consolidations" / entry
    snap.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous().cpu() for k, v in before.items()}, str(snap / "before.safetensors")
    )
    save_file({k: v.contiguous().cpu() for k, v in after.items()}, str(snap / "after.safetensors"))
    record = {"type": "consolidation", "entry": entry, "time": time.time(),
              "snapshot": f"consolidations/{entry}",
              **{k: v for k, v in asdict(result).items() if k not in ("entry", "samples")}}  # fmt: skip
    with open(run / "ledger.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")
    if store is not None:
        for item_id in result.items:
            store.set_consolidated(item_id, entry, actor=actor)
    return entry


def _ledger_records(run: Path) -> list[dict]:
    ledger = run / "ledger.jsonl"
    if not ledger.is_file():
        return []
    return [json.loads(x) for x in ledger.read_text("utf-8").splitlines() if x]


def live_consolidations(run_dir: str | Path) -> list[dict]:
    """The consolidation records whose weights are still in the adapter (not rolled back), in
    ledger order."""
    live: dict[str, dict] = {}
    for r in _ledger_records(Path(run_dir)):
        if r.get("type") == "consolidation":
            live[r["entry"]] = r
        elif r.get("type") == "consolidation_rollback":
            live.pop(r["entry"], None)
    return list(live.values())


def rollback_consolidation(model, run_dir: str | Path, entry: str, store=None) -> list[str]:
    """Restore the adapter weights saved before ``entry`` (bit-exact); un-mark its items.
    Later consolidations still in the adapter are undone too (the weights go back past them):
    each gets its own rollback record and its items are un-marked. Returns the ids of every
    un-marked item, ``entry``'s first."""
    run = Path(run_dir)
    found = [r for r in _ledger_records(run) if r.get("type") == "consolidation"
             and r["entry"] == entry]  # fmt: skip
    if not found:
        raise UserError(f"no consolidation {entry!r} in {run}/ledger.jsonl")
    live = live_consolidations(run)
    names = [r["entry"] for r in live]
    undone = [found[0]] + (live[names.index(entry) + 1 :] if entry in names else [])
    load_adapter_state(model, load_file(str(run / found[0]["snapshot"] / "before.safetensors")))
    with open(run / "ledger.jsonl", "a", encoding="utf-8") as fh:
        for r in undone:
            fh.write(json.dumps({"type": "consolidation_rollback", "entry": r["entry"]}) + "\n")
    items = [i for r in undone for i in r["items"]]
    if store is not None:
        for r in undone:
            for item_id in r["items"]:
                if store.get(item_id).consolidated_into == r["entry"]:
                    store.set_consolidated(item_id, None, actor="rollback")
    return items


def stable_items(store, scope, *, min_retrievals: int = 1) -> list[Item]:
    """Active, not yet consolidated items retrieved at least ``min_retrievals`` times."""
    return [it for it in store.list(scope) if it.text and it.consolidated_into is None
            and it.retrieval_count >= min_retrievals]  # fmt: skip


# ---- the comparison: plain fine-tuning ----------------------------------------------------------


def finetune_passages(model, tokenizer, texts: Sequence[str], *, tokens: int | None = None,
                      passes: int = 1, lr: float = 1e-3, batch_size: int = 8, seq_len: int = 128,
                      seed: int = 0) -> int:  # fmt: skip
    """Plain next-token fine-tuning of the adapter on ``texts`` (cut into ``seq_len`` windows),
    for ``passes`` passes or until ``tokens`` trained tokens; returns the tokens trained."""
    params, pad = _trainable(model), tokenizer.pad_token_id
    windows = []
    for t in texts:
        ids = encode(tokenizer, t) + ([tokenizer.eos_token_id] if tokenizer.eos_token_id else [])
        windows += [ids[i : i + seq_len] for i in range(0, len(ids), seq_len) if len(ids) - i > 1]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng, done = random.Random(seed), 0
    model.train()
    for _ in range(passes if tokens is None else 10_000):
        order = list(range(len(windows)))
        rng.shuffle(order)
        for i in range(0, len(order), batch_size):
            chunk = [windows[j] for j in order[i : i + batch_size]]
            if tokens is not None:  # the budget: cut the last batch to fit
                left = tokens - done
                chunk = [w[: max(2, left // len(chunk))] for w in chunk] if left > 0 else []
            if not chunk:
                model.eval()
                return done
            ids, mask = pad_right(chunk, pad, model.device)
            labels = ids.masked_fill(mask == 0, -100)
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            done += int(mask.sum())
    model.eval()
    return done
