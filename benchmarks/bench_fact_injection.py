"""Which training signal puts facts into the weights: closed-book probes of the first documents
of Fictional Knowledge after one of three ways of training a fresh LoRA adapter on them.

    python benchmarks/bench_fact_injection.py --mode documents --epochs 12 --every 3 --out F
    python benchmarks/bench_fact_injection.py --mode paraphrases --epochs 3 --out F
    python benchmarks/bench_fact_injection.py --mode distil --out F

* ``documents``: next-token fine-tuning on each document (the stream's text), in the
  closed-book format the probes use (chat template, "Continue the text.", the text as the
  answer), 256-token windows, batch 8;
* ``paraphrases``: the same on each document and the data set's own 9 paraphrases of it. The
  learner never has these (they are not in the stream); the row shows what diverse wording of
  the same facts buys, the ceiling a rewrite can aim at;
* ``distil``: ``consolidate()`` on the documents' passages, with its defaults unless flags say
  otherwise (``memory/knowledge/distil.py``), its general anchor from the bundled general text
  (train split, after the gate's windows) and no gate (tolerance 100).

Every evaluation scores the memorisation, paraphrase and composition probes of the documents
(exact match of the greedy continuation, target NLL; ``bench/knowledge_probes.py``) and the
NLL of 8 held-out general windows (test split). Results: one JSON record per evaluation.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch

from herllm.acquire.corpus import load_documents as corpus_docs
from herllm.bench.knowledge import load_documents
from herllm.bench.knowledge_probes import Prober, summarize_probes
from herllm.bench.suite import pack_batches
from herllm.config import LoraConfig, ModelConfig
from herllm.memory.knowledge import KnowledgeStore, Scope
from herllm.memory.knowledge.consolidate import consolidate, retention_nll, stable_items
from herllm.memory.knowledge.consolidate_run import anchor_windows
from herllm.memory.knowledge.distil import encode, pad_right, render
from herllm.models.load import attach_lora, load_base


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", required=True, choices=["documents", "paraphrases", "distil"])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--docs", type=int, default=4, help="the first N documents")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--r", type=int, default=16, help="LoRA rank (alpha = 2r)")
    p.add_argument("--epochs", type=int, default=3, help="fine-tuning modes: epochs")
    p.add_argument("--every", type=int, default=1, help="fine-tuning modes: evaluate every N")
    p.add_argument("--passes", type=int, default=4, help="distil: passes")
    p.add_argument("--rewrites", type=int, default=4, help="distil: rewrites per item")
    p.add_argument("--shuffles", type=int, default=2, help="distil: reorderings per item")
    p.add_argument("--anchor-share", type=float, default=0.3, help="distil: anchor tokens share")
    p.add_argument("--out", required=True)
    args = p.parse_args()

    torch.manual_seed(0)
    base, tok = load_base(ModelConfig(name_or_path=args.model))
    model = attach_lora(base, LoraConfig(r=args.r, alpha=2 * args.r)).eval()
    docs = load_documents("")[: args.docs]
    ids = list(range(len(docs)))
    prober, log = Prober(tok, docs), []
    general = pack_batches(corpus_docs("general", "test"), tok, 128, 8)

    def evaluate(tag: str, extra: dict | None = None) -> None:
        t = time.perf_counter()
        rec = {"tag": tag, **summarize_probes(prober.score(model, ids), 1),
               "general_nll": retention_nll(model, general), "eval_s": time.perf_counter() - t,
               **(extra or {})}  # fmt: skip
        log.append(rec)
        print(json.dumps(rec), flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"args": vars(args), "records": log}, indent=1))

    evaluate("start")
    if args.mode == "distil":
        tmp = Path(tempfile.mkdtemp())
        store, scope = KnowledgeStore(tmp / "k.sqlite"), Scope("run", "bench")
        for d in ids:
            store.ingest_document(docs[d]["train_context"], f"doc-{d}", scope)
        items = stable_items(store, scope, min_retrievals=0)
        gate = pack_batches(corpus_docs("general", "train"), tok, 128, 8)
        res = consolidate(model, tok, store, items, run_dir=tmp, passes=args.passes, lr=args.lr,
                          rewrites=args.rewrites, shuffles=args.shuffles,
                          anchor=anchor_windows(tok), anchor_share=args.anchor_share,
                          retention={"general": gate}, tolerance=100.0)  # fmt: skip
        evaluate("distil", {"items": len(items), "samples": len(res.samples),
                            "tokens": res.tokens_trained, "seconds": res.seconds,
                            "kl": [res.kl_before, res.kl_after],
                            "gate_general": [res.retention_before["general"],
                                             res.retention_after["general"]]})  # fmt: skip
        return
    texts = [d["train_context"] for d in docs]
    if args.mode == "paraphrases":
        texts = [t for d in docs for t in [d["train_context"], *d["paraphrases"]]]
    windows = []
    for text in texts:  # the closed-book format of the probes, then end of text
        x = encode(tok, render(tok, text)) + [tok.eos_token_id]
        windows += [x[i : i + 256] for i in range(0, len(x), 256) if len(x) - i > 1]
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    rng, tokens, t0 = random.Random(0), 0, time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        order = list(range(len(windows)))
        rng.shuffle(order)
        for i in range(0, len(order), 8):
            x, m = pad_right([windows[j] for j in order[i : i + 8]], tok.pad_token_id, model.device)
            loss = model(input_ids=x, attention_mask=m, labels=x.masked_fill(m == 0, -100)).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            tokens += int(m.sum())
        model.eval()
        if (epoch + 1) % args.every == 0 or epoch + 1 == args.epochs:
            evaluate(f"epoch{epoch + 1}", {"tokens": tokens, "train_s": time.perf_counter() - t0})


if __name__ == "__main__":
    main()
