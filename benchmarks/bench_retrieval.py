"""Retrieval recall of the knowledge store on the 65 Fictional Knowledge dev documents.

Each document is ingested as passages (100-200 words) into one store per encoder; each probe
(mem_input, gen_input, hard_gen_input; 5 of each per document) is a query, and a hit is a
passage of the probe's own document in the top k. Scoring goes through the store's own
``candidates`` + ``retrieval.rank``, the same path as ``KnowledgeStore.search``.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/bench_retrieval.py \
        --out benchmarks/results/retrieval.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from herllm.memory.knowledge import KnowledgeStore, Scope, load_encoder
from herllm.memory.knowledge.retrieval import rank

DATA = Path("/work/shared/data/fictional-knowledge/fictional_knowledge_dev.json")
PROBES = ("mem_input", "gen_input", "hard_gen_input")
KS = (1, 3, 5)
SCOPE = Scope("run", "bench")


def load_docs(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))


def build_store(path: Path, docs: list[dict], encoder) -> KnowledgeStore:
    store = KnowledgeStore(path, encoder)
    for i, doc in enumerate(docs):
        store.ingest_document(doc["train_context"], f"fk-{i:02d}", SCOPE, source=str(DATA))
    return store


def recalls(store: KnowledgeStore, docs, qvecs, mode: str, weight: float) -> dict:
    """{probe: {k: recall}} for one retrieval mode."""
    cands = store.candidates([SCOPE])
    doc_of = np.array(cands.doc_ids)
    out = {}
    for probe in PROBES:
        hits = {k: 0 for k in KS}
        n = 0
        for i, doc in enumerate(docs):
            for query in doc[probe]:
                qvec = None if qvecs is None else qvecs[probe][n]
                ranking = rank(query, qvec, cands.bm25, cands.embeddings, mode=mode, weight=weight)
                scores = ranking.scores
                top = doc_of[np.argsort(-scores, kind="stable")[: max(KS)]]
                for k in KS:
                    hits[k] += int(f"fk-{i:02d}" in top[:k])
                n += 1
        out[probe] = {k: hits[k] / n for k in KS}
    out["all"] = {k: float(np.mean([out[p][k] for p in PROBES])) for k in KS}
    return out


def query_vectors(encoder, docs) -> dict[str, np.ndarray]:
    return {p: encoder.encode([q for d in docs for q in d[p]]) for p in PROBES}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [
            ln.split(":", 1)[1].strip()
            for ln in cpuinfo.read_text().splitlines()
            if ln.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    return f"{os.cpu_count()}-core CPU ({cpu}), torch threads 1, torch {torch.__version__}"


def table(results: dict) -> str:
    lines = [
        "| method | probes | R@1 | R@3 | R@5 |",
        "| --- | --- | --- | --- | --- |",
    ]
    for method, per_probe in results.items():
        for probe, r in per_probe.items():
            lines.append(f"| {method} | {probe} | {r[1]:.3f} | {r[3]:.3f} | {r[5]:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/retrieval.json"))
    parser.add_argument("--encoders", default="minilm,tiny")
    parser.add_argument("--weights", default="0.1,0.2,0.3,0.4,0.5,0.7")
    args = parser.parse_args()
    torch.set_num_threads(1)
    docs = load_docs(args.data)
    weights = [float(w) for w in args.weights.split(",")]
    results, timings, n_passages = {}, {}, 0
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.encoders.split(","):
            encoder = load_encoder(spec)
            t0 = time.perf_counter()
            store = build_store(Path(tmp) / f"{spec}.sqlite", docs, encoder)
            qvecs = query_vectors(encoder, docs)
            timings[spec] = round(time.perf_counter() - t0, 2)
            n_passages = len(store.candidates([SCOPE]).ids)
            if "bm25" not in results:
                results["bm25"] = recalls(store, docs, None, "bm25", 0.0)
            results[f"{spec} dense"] = recalls(store, docs, qvecs, "dense", 0.0)
            results[f"{spec} rrf"] = recalls(store, docs, qvecs, "rrf", 0.0)
            for w in weights:
                results[f"{spec} hybrid w={w}"] = recalls(store, docs, qvecs, "hybrid", w)
            store.close()
    print(table(results))
    record = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "command": "OMP_NUM_THREADS=1 PYTHONPATH=src python " + " ".join(sys.argv),
        "documents": len(docs),
        "passages": n_passages,
        "queries_per_probe": len(docs) * 5,
        "encode_seconds": timings,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1), encoding="utf-8")
    print(f"\nwritten {args.out}")


if __name__ == "__main__":
    main()
