"""Latency of one answer from a SmolLM2 run with and without retrieval from its knowledge store.

A one-step run on `smollm2-135m` is adapted in a temporary directory, the 65 Fictional
Knowledge dev documents (`train_context`) go into its store (MiniLM, 100-200-word passages,
the run's own scope), and ten prompts (each document's first `gen_input`) are answered with
`AdaptedModel.generate` (64 new tokens, greedy, `min_new_tokens` pinned so both sides decode
exactly 64) with the store and without it, interleaved. Reported: p50 / p90 seconds per
answer, the share retrieval adds, the retrieval call alone, and the prompt tokens. Also the
relevance (cosine) of the top passage for these prompts and for ten unrelated ones, which is
what `knowledge.threshold` has to separate.

    OMP_NUM_THREADS=1 PYTHONPATH=src flock /tmp/herllm-cpu.lock \
        python benchmarks/bench_knowledge_latency.py --out benchmarks/results/knowledge_latency.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from herllm.config import build_config
from herllm.infer.adapted import AdaptedModel
from herllm.memory.knowledge import KnowledgeStore, load_encoder
from herllm.memory.knowledge.ingest import STORE_FILE, run_scope
from herllm.run.learner import Learner

DATA = Path("/work/shared/data/fictional-knowledge/fictional_knowledge_dev.json")
UNRELATED = [
    "Write a short poem about the sea at night.",
    "How do I reverse a list in Python?",
    "What is the boiling point of water at sea level?",
    "Give me a recipe for pancakes.",
    "Explain how a bicycle gear works.",
    "Who painted the Mona Lisa?",
    "Translate 'good morning' into French.",
    "What are the rules of chess castling?",
    "Describe the colour of a clear sky.",
    "How many legs does a spider have?",
]


def make_run(root: Path, docs: list[dict], k: int) -> Path:
    (root / "s.txt").write_text(docs[0]["train_context"], encoding="utf-8")
    cfg = build_config(None, ["model.name_or_path=smollm2-135m", f"run_dir={root / 'run'}",
                              f"stream.sources=[{root / 's.txt'}]", "stream.seq_len=64",
                              "train.batch_size=1", "train.max_steps=1", "replay.capacity=0",
                              f"knowledge.k={k}", "knowledge.threshold=0.0"])  # fmt: skip
    with Learner(cfg, show_progress=False) as learner:
        learner.run()
    run = root / "run"
    with KnowledgeStore(run / STORE_FILE, load_encoder("minilm"), actor="bench") as store:
        for i, doc in enumerate(docs):
            store.ingest_document(doc["train_context"], f"fk-dev-{i}", run_scope("", run))
    return run


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def pct(values: list[float], q: float) -> float:
    return (
        statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]
        if len(values) > 1
        else values[0]
    )


def measure(m: AdaptedModel, prompts: list[str], new_tokens: int) -> dict:
    store = m.knowledge
    with_s, without_s, retrieve_s, prompt_tokens = [], [], [], []
    for prompt in prompts:
        m.knowledge = store
        t, _ = timed(lambda p=prompt: m.generate(p, max_new_tokens=new_tokens))
        with_s.append(t)
        facts = "\n".join(h.item.text for h in m.last_retrieval[0])
        prompt_tokens.append(len(m.tokenizer(facts + prompt)["input_ids"]))
        retrieve_s.append(timed(lambda p=prompt: m.retrieve(p))[0])
        m.knowledge = None
        without_s.append(timed(lambda p=prompt: m.generate(p, max_new_tokens=new_tokens))[0])
    m.knowledge = store
    p50_with, p50_without = statistics.median(with_s), statistics.median(without_s)
    return {
        "p50_with_s": p50_with, "p50_without_s": p50_without,
        "p90_with_s": pct(with_s, 90), "p90_without_s": pct(without_s, 90),
        "added_share_p50": p50_with / p50_without - 1.0,
        "retrieve_p50_s": statistics.median(retrieve_s),
        "prompt_tokens_with_p50": statistics.median(prompt_tokens),
        "with_s": with_s, "without_s": without_s,
    }  # fmt: skip


def relevance(m: AdaptedModel, prompts: list[str]) -> list[float]:
    return [round(max((h.relevance for h in m.retrieve(p, k=1)), default=0.0), 3) for p in prompts]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--prompts", type=int, default=10)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--ks", type=int, nargs="+", default=[3, 1])
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    docs = json.loads(args.data.read_text(encoding="utf-8"))
    prompts = [d["gen_input"][0] for d in docs[: args.prompts]]
    result = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": platform.node(),
              "torch_threads": torch.get_num_threads(), "documents": len(docs),
              "prompts": len(prompts), "new_tokens": args.new_tokens, "by_k": {}}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        m = AdaptedModel.from_run(make_run(Path(tmp), docs, args.ks[0]))
        m.model.get_base_model().generation_config.min_new_tokens = args.new_tokens
        result["passages"] = len(m.knowledge.store.list(m.knowledge.scope))
        m.generate(prompts[0], max_new_tokens=8)  # warm-up: first-call allocations
        for k in args.ks:
            m.knowledge.k = k
            result["by_k"][str(k)] = measure(m, prompts, args.new_tokens)
        result["top_relevance_related"] = relevance(m, prompts)
        result["top_relevance_unrelated"] = relevance(m, UNRELATED)
        question = [{"role": "user", "content": "What is Malm Town's English nickname?"}]
        t, reply = timed(lambda: m.chat(question, max_new_tokens=args.new_tokens))
        result["chat_sample"] = {"seconds": t, "reply": reply,
                                 "passages": [h.item.doc_id for h in m.last_retrieval[0]]}  # fmt: skip
        m.knowledge.close()
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
