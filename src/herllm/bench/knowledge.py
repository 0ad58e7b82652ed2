"""`herllm bench --scenario knowledge`: Fictional Knowledge documents as an unlabeled stream.

The documents (the bundled development half, or any JSON file of the same format) arrive one
after another, in ``orders`` orders. At the end of each quarter of the stream every document
seen so far is probed: memorisation, paraphrase and composition probes, scored by exact match of
the greedy continuation (folded) and by the target's NLL (:mod:`herllm.evaluate.knowledge`).
General ability is the NLL of held-out general text (HER-Stream ``general`` test split), i.e.
what the base model already knew. Rows:

* ``base``; ``in-context`` (the probe's own document in the prompt: what retrieval can reach);
* ``naive-1``, ``naive-P``, ``replay-1``, ``replay-P``, ``her-P``: the learner on the stream
  (P passes: each document repeated P times as it arrives);
* ``knowledge``: every document ingested into a KnowledgeStore as it arrives, retrieval into the
  prompt, no training;
* ``knowledge+consolidate``: the same, and at each quarter's end the new items are distilled
  into a LoRA adapter (``memory/knowledge/consolidate.py``), gated on general text and earlier
  consolidations' samples; ``consolidated``: the same weights with retrieval off;
* ``passage-ft``: plain fine-tuning on the passages with the tokens consolidation trained.
"""

from __future__ import annotations

import gc
import json
import random
import shutil
import statistics
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from herllm.bench.knowledge_probes import KINDS, Prober, summarize_probes
from herllm.errors import UserError
from herllm.memory.knowledge.consolidate import (
    consolidate,
    finetune_passages,
    retention_nll,
    stable_items,
)  # fmt: skip
from herllm.memory.knowledge.distil import encode, render

LEARNER_ROWS = ("naive", "replay", "her")


@dataclass
class KnowledgeBenchConfig:
    data: str = ""
    """A JSON file in the Fictional Knowledge format; empty = the bundled development half."""
    docs: int = 16
    """Documents in the stream (the first N of the file)."""
    orders: int = 3
    """Document orders (order 0 as in the file, the others seeded permutations)."""
    passes: int = 3
    """Passes of the several-pass rows (each document repeated as it arrives)."""
    rows: list[str] = field(default_factory=list)
    """Rows to run (default: every row)."""
    model: str = "smollm2-135m"
    """Base model."""
    encoder: str = "minilm"
    """Retrieval encoder of the store (minilm, tiny, lm:PATH, or none for BM25 only)."""
    k: int = 3
    """Passages retrieved into the prompt."""
    consolidate_passes: int = 4
    """Passes over the teacher's samples per consolidation."""
    prompts: int = 8
    """Teacher prompts per item."""
    new_tokens: int = 32
    """Tokens the teacher generates per prompt."""
    whole: bool = True
    """Distil on each item's passage itself too."""
    shuffles: int = 2
    """Versions of each passage with its sentences reordered, distilled on."""
    rewrites: int = 4
    """Texts the teacher writes about each item (sampled), distilled on."""
    rewrite_tokens: int = 160
    """Tokens of each rewrite."""
    anchor_windows: int = 64
    """General windows (train split, after the gate's) that consolidation may train toward the
    model as it was before it, beside the items' samples (about 0.3 of their tokens)."""
    consolidate_lr: float = 1e-3
    """Learning rate of consolidation."""
    tolerance: float = 0.02
    """Consolidation gate: largest relative NLL rise allowed on general text."""
    earlier_keep: float = 0.9
    """Consolidation gate: share of what earlier consolidations hold (check KL) to keep."""
    replay_share: float = 0.3
    """Earlier consolidations' samples replayed, as a share of the new items' tokens."""
    lr: float = 1e-3
    lora_r: int = 16
    seq_len: int = 128
    batch_size: int = 8
    general_windows: int = 16
    """Held-out general windows (and as many for the consolidation gate, from another split)."""
    latency_probes: int = 10
    seed: int = 0
    out: str = "results/bench-knowledge"


QUICK = {"model": "herllm-tiny", "docs": 4, "orders": 1, "passes": 2, "encoder": "none",
         "prompts": 4, "new_tokens": 16, "general_windows": 4, "latency_probes": 4,
         "consolidate_passes": 2, "shuffles": 1, "rewrites": 2, "rewrite_tokens": 48,
         "anchor_windows": 16}  # fmt: skip
"""`--quick`: herllm-tiny, 4 documents, 1 order, 2 passes, BM25, small consolidation."""


def all_rows(bc: KnowledgeBenchConfig) -> list[str]:
    p = bc.passes
    return ["base", "in-context", "naive-1", f"naive-{p}", "replay-1", f"replay-{p}", f"her-{p}",
            "knowledge", "knowledge+consolidate", "consolidated", "passage-ft"]  # fmt: skip


def load_documents(path: str) -> list[dict]:
    """The records of a Fictional Knowledge JSON file, checked."""
    if path:
        file = Path(path)
    else:
        file = Path(str(resources.files("herllm"))) / "assets/fictional-knowledge"
        file = file / "fictional_knowledge_dev.json"
    try:
        records = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"--data {file}: not a readable JSON file ({exc})") from None
    need = ["train_context"] + [f"{k}_{s}" for k in KINDS for s in ("input", "target")]
    for i, r in enumerate(records if isinstance(records, list) else [None]):
        missing = [k for k in need if not isinstance(r, dict) or k not in r]
        if missing:
            raise UserError(f"--data {file}: record {i} lacks {', '.join(missing)}")
    return records


# ---- one order --------------------------------------------------------------------------------


class OrderRun:
    """Every row over one document order; quarter q ends after ``ends[q]`` documents."""

    def __init__(self, bc, docs, order, k, tokenizer, general, gate, anchor=()):
        self.bc, self.docs, self.order, self.k = bc, docs, order, k
        self.tok, self.general, self.gate, self.anchor = tokenizer, general, gate, anchor
        self.prober = Prober(tokenizer, docs)
        n = len(order)
        self.ends = sorted({max(1, round(n * q / 4)) for q in range(1, 5)})
        self.first = order[: self.ends[0]]
        self.root = Path(bc.out) / "runs" / f"order{k}"

    def evaluate(self, model, q: int, context=None, quarters: list | None = None) -> dict:
        """Probe the documents seen by quarter ``q``; returns summary + first-quarter EM."""
        seen = self.order[: self.ends[q]]
        scored = self.prober.score(model, seen, context)
        first = [r for r in scored if r["doc"] in self.first]
        rec = {"quarter": q + 1, "docs_seen": len(seen), **summarize_probes(scored, self.bc.k),
               "first_docs": summarize_probes(first, self.bc.k)}  # fmt: skip
        if quarters is not None:
            quarters.append(rec)
        return rec

    def finish(self, model, quarters, t0, tokens, extra=None) -> dict:
        return {"quarters": quarters, "final": quarters[-1],
                "general_nll": retention_nll(model, self.general), "tokens_trained": tokens,
                "seconds": time.perf_counter() - t0, **(extra or {})}  # fmt: skip

    def base_model(self):
        from herllm.config import LoraConfig, ModelConfig
        from herllm.models.load import attach_lora, load_base

        torch.manual_seed(self.bc.seed + self.k)
        model, _ = load_base(ModelConfig(name_or_path=self.bc.model))
        return attach_lora(model, LoraConfig(r=self.bc.lora_r, alpha=2 * self.bc.lora_r)).eval()

    def static(self, model, in_context: bool) -> dict:
        """base / in-context: nothing changes during the stream, so every quarter is the end's
        scores restricted to the documents seen by then."""
        t0 = time.perf_counter()
        ctx = (lambda d, p: ([self.docs[d]["train_context"]], [])) if in_context else None
        with model.disable_adapter():
            final = self.prober.score(model, self.order, ctx)
            quarters = []
            for q, end in enumerate(self.ends):
                seen = set(self.order[:end])
                part = [r for r in final if r["doc"] in seen]
                first = [r for r in final if r["doc"] in self.first]
                quarters.append({"quarter": q + 1, "docs_seen": end, **summarize_probes(part, 1),
                                 "first_docs": summarize_probes(first, 1)})  # fmt: skip
            return self.finish(model, quarters, t0, 0)

    def learner_row(self, strategy: str, passes: int) -> dict:
        from herllm.config import build_config
        from herllm.run.learner import Learner
        from herllm.strategies import strategy_overrides

        run_dir = self.root / f"{strategy}-{passes}"
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        stream = run_dir.parent / f"stream-{passes}.txt"
        texts = [self.docs[d]["train_context"] for d in self.order for _ in range(passes)]
        stream.write_text("\n\x1e\n".join(texts), encoding="utf-8")
        extra = int(self.tok.bos_token_id is not None) + int(self.tok.eos_token_id is not None)
        per_doc = [(len(self.tok(t, add_special_tokens=False)["input_ids"]) + extra) for t in texts]
        bounds = np.cumsum(per_doc)
        cfg = build_config(None, [
            f"model.name_or_path={self.bc.model}", f"run_dir={run_dir}", f"stream.sources=[{stream}]",
            f"stream.seq_len={self.bc.seq_len}", f"train.batch_size={self.bc.batch_size}",
            f"train.lr={self.bc.lr}", f"lora.r={self.bc.lora_r}", f"lora.alpha={2 * self.bc.lora_r}",
            f"train.seed={self.bc.seed + self.k}", "checkpoint.every_steps=1000000",
            "eval.every_steps=1000000", "replay.capacity=20000", "shift.warmup=32",
            "shift.cooldown=60", *strategy_overrides(strategy),
        ])  # fmt: skip
        learner, t0, quarters = Learner(cfg, show_progress=False), time.perf_counter(), []
        try:
            for q, end in enumerate(self.ends):
                last = q == len(self.ends) - 1
                learner.run(until_tokens=None if last else int(bounds[end * passes - 1]))
                self.evaluate(learner.s.inference_model(), q, quarters=quarters)
            model = learner.s.inference_model()
            return self.finish(model, quarters, t0, learner.s.counters["tokens_trained"])
        finally:
            learner.close()

    def store_rows(self, wanted: set[str]) -> dict[str, dict]:
        """knowledge, knowledge+consolidate and consolidated share one store and one loop."""
        from herllm.memory.knowledge import KnowledgeStore, Scope, load_encoder

        run = self.root / "knowledge"
        shutil.rmtree(run, ignore_errors=True)
        run.mkdir(parents=True)
        encoder = None if self.bc.encoder == "none" else load_encoder(self.bc.encoder)
        store, scope = KnowledgeStore(run / "knowledge.sqlite", encoder), Scope("run", "bench")
        model = self.base_model()
        ids: dict[str, int] = {}

        def retrieve(d, prompt):
            hits = store.search(prompt, scope=scope, k=self.bc.k)
            return [h.item.text for h in hits], [str(ids[h.item.id]) for h in hits]

        out = {r: {"quarters": []} for r in ("knowledge", "knowledge+consolidate", "consolidated")}
        t0, tokens, budgets, log, done = time.perf_counter(), 0, [], [], 0
        for q, end in enumerate(self.ends):
            for d in self.order[done:end]:  # the documents arrive: ingest them
                for it in store.ingest_document(self.docs[d]["train_context"], f"doc-{d}", scope):
                    ids[it.id] = d
            done = end
            if "knowledge" in wanted:
                with model.disable_adapter():
                    self.evaluate(model, q, retrieve, out["knowledge"]["quarters"])
            if not wanted & {"knowledge+consolidate", "consolidated", "passage-ft"}:
                continue
            items = stable_items(store, scope, min_retrievals=0)
            res = consolidate(model, self.tok, store, items, run_dir=run,
                              retention={"general": self.gate},
                              passes=self.bc.consolidate_passes, lr=self.bc.consolidate_lr,
                              prompts=self.bc.prompts, new_tokens=self.bc.new_tokens,
                              whole=self.bc.whole, shuffles=self.bc.shuffles,
                              rewrites=self.bc.rewrites, rewrite_tokens=self.bc.rewrite_tokens,
                              anchor=self.anchor, tolerance=self.bc.tolerance,
                              earlier_keep=self.bc.earlier_keep,
                              replay_share=self.bc.replay_share, seed=self.bc.seed + q)  # fmt: skip
            tokens += res.tokens_trained if res.accepted else 0
            budgets.append(res.tokens_trained)
            log.append({k: v for k, v in asdict(res).items() if k != "samples"})
            self.evaluate(model, q, retrieve, out["knowledge+consolidate"]["quarters"])
            self.evaluate(model, q, None, out["consolidated"]["quarters"])
        latency = self.latency(model, retrieve)
        gen_base = None
        with model.disable_adapter():
            gen_base = retention_nll(model, self.general)
        store.close()
        result = {}
        for name, row in out.items():
            if name in wanted and row["quarters"]:
                extra = {"latency": latency}
                if name != "knowledge":
                    extra["consolidations"] = log
                    extra["budgets"] = budgets
                r = self.finish(
                    model, row["quarters"], t0, 0 if name == "knowledge" else tokens, extra
                )
                if name == "knowledge":
                    r["general_nll"] = gen_base
                result[name] = r
        if "passage-ft" in wanted:
            result["passage-ft"] = self.passage_ft(budgets)
        return result

    @torch.no_grad()
    def latency(self, model, retrieve) -> dict:
        """Median seconds per probe answer (8 new tokens), without and with retrieval."""
        probes = self.prober.probes(self.order)[: self.bc.latency_probes]
        times = {"plain": [], "retrieval": []}
        with model.disable_adapter():
            for d, _kind, prompt, _t in probes:
                for key in times:
                    t = time.perf_counter()
                    passages = retrieve(d, prompt)[0] if key == "retrieval" else []
                    x = torch.tensor([encode(self.tok, render(self.tok, prompt, passages))])
                    model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=8,
                                   min_new_tokens=8, do_sample=False, use_cache=True,
                                   pad_token_id=self.tok.pad_token_id, temperature=None,
                                   top_p=None, top_k=None)  # fmt: skip
                    times[key].append(time.perf_counter() - t)
        med = {k: statistics.median(v) for k, v in times.items()}
        return {**med, "overhead": med["retrieval"] / med["plain"] - 1.0}

    def passage_ft(self, budgets: list[int]) -> dict:
        """Plain fine-tuning on the passages of each quarter's documents, same tokens."""
        from herllm.memory.knowledge import split_passages

        model, t0, quarters, tokens, done = self.base_model(), time.perf_counter(), [], 0, 0
        for q, end in enumerate(self.ends):
            texts = [p.text for d in self.order[done:end]
                     for p in split_passages(self.docs[d]["train_context"])]  # fmt: skip
            done = end
            tokens += finetune_passages(model, self.tok, texts, tokens=budgets[q], lr=self.bc.lr,
                                        batch_size=self.bc.batch_size, seq_len=self.bc.seq_len,
                                        seed=self.bc.seed + q)  # fmt: skip
            self.evaluate(model, q, None, quarters)
        return self.finish(model, quarters, t0, tokens)


def run_knowledge_bench(
    bc: KnowledgeBenchConfig, progress=print, command: str | None = None
) -> dict:
    """Every row over every order; writes results.json and report.md into ``bc.out``."""
    from herllm.acquire.corpus import load_documents as corpus_docs
    from herllm.bench.knowledge_report import write_report
    from herllm.bench.runner import machine_info
    from herllm.bench.suite import pack_batches
    from herllm.config import ModelConfig
    from herllm.evaluate.cost import measure_matmul_peak
    from herllm.models.load import load_base

    rows = bc.rows or all_rows(bc)
    unknown = [r for r in rows if r not in all_rows(bc)]
    if unknown:
        raise UserError(f"unknown rows {unknown}; choose from {', '.join(all_rows(bc))}")
    docs = load_documents(bc.data)[: bc.docs]
    if len(docs) < 4:
        raise UserError(f"--docs {bc.docs}: the stream needs at least 4 documents (one a quarter)")
    out = Path(bc.out)
    out.mkdir(parents=True, exist_ok=True)
    _, tok = load_base(ModelConfig(name_or_path=bc.model))
    general = pack_batches(corpus_docs("general", "test"), tok, bc.seq_len, bc.general_windows)
    gate = pack_batches(corpus_docs("general", "train"), tok, bc.seq_len, bc.general_windows)
    more = pack_batches(
        corpus_docs("general", "train"), tok, bc.seq_len, bc.general_windows + bc.anchor_windows
    )  # the gate's, then the anchor's
    anchor = [w.tolist() for b in more for w in b["input_ids"]][bc.general_windows :]
    results = {"scenario": "knowledge", "date": time.strftime("%Y-%m-%d %H:%M"), "command": command,
               "config": asdict(bc), "machine": machine_info(measure_matmul_peak()), "runs": []}  # fmt: skip
    for k in range(bc.orders):
        order = list(range(len(docs)))
        if k:
            random.Random(bc.seed + k).shuffle(order)
        run = OrderRun(bc, docs, order, k, tok, general, gate, anchor)
        done: dict[str, dict] = {}
        for row in rows:
            if row in done:
                continue
            progress(f"[bench knowledge] order {k}: {row}")
            try:
                if row in ("base", "in-context"):
                    model = run.base_model()
                    done[row] = run.static(model, row == "in-context")
                elif row.split("-")[0] in LEARNER_ROWS:
                    name, passes = row.split("-")
                    done[row] = run.learner_row(name, int(passes))
                else:
                    done |= run.store_rows({r for r in rows if r not in done})
            except UserError:
                raise
            except Exception as exc:  # a failed row is reported as failed, never made up
                done[row] = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"}
            gc.collect()
            results["runs"] = [r for r in results["runs"] if r["order"] != k] + [
                {"order": k, "row": name, "status": "ok", **v} for name, v in done.items()
            ]
            (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    write_report(out, results)
    return results


def main_from_args(args, overrides: list[str], command: str) -> int:
    """`herllm bench --scenario knowledge`: the bench flags that apply, plus --data, --docs,
    --passes and --quick; prints where the results are."""
    import sys

    from herllm.config import apply_overrides, from_dict

    names = {f for f in KnowledgeBenchConfig.__dataclass_fields__}
    given = {k.removeprefix("knowledge."): v for k, v in (o.split("=", 1) for o in overrides)}
    alien = sorted(k for k in given if k not in names)
    if alien:
        raise UserError(f"--scenario knowledge does not take --{', --'.join(alien)}")
    data = apply_overrides(
        dict(QUICK) if args.quick else {}, [f"{k}={v}" for k, v in given.items()]
    )
    bc = from_dict(KnowledgeBenchConfig, data)
    quiet = getattr(args, "quiet", False)
    run_knowledge_bench(bc, (lambda m: None) if quiet else (lambda m: print(m, file=sys.stderr)),
                        command)  # fmt: skip
    print(f"results: {Path(bc.out) / 'results.json'}\nreport: {Path(bc.out) / 'report.md'}")
    return 0
