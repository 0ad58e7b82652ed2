"""The `knowledge` section: the run's knowledge store (ingest, encoder, scope) and the
retrieval into answers' prompts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from herllm.config.fields import Range


@dataclass
class KnowledgeConfig:
    ingest: bool = False
    """Put every document the learner reads into the run's knowledge store
    (RUN_DIR/knowledge.sqlite), split into passages with provenance (document id, character
    offsets, source path); each document once, across crashes and resumes too."""
    encoder: str = "minilm"
    """Embedding encoder of ingested passages: `minilm`, `tiny`, `lm:PATH` or `none` (BM25
    only); a store keeps the encoder it was first written with."""
    scope: str = ""
    """Scope of ingested passages and of answers' retrieval, `KIND:ID` (user, agent or run);
    empty: `run:<run directory name>`."""
    min_words: Annotated[int, Range(ge=1)] = 100
    """Passages close at a paragraph end once they have this many words."""
    max_words: Annotated[int, Range(ge=1)] = 200
    """Passages hold at most this many words (a short tail joins the passage before)."""
    k: Annotated[int, Range(ge=1)] = 1
    """Passages retrieved into an answer's prompt (`herllm generate`) at most. 1 keeps an answer
    within 30% of its time without retrieval on SmolLM2 (+20%; 3 passages: +52%, the longer
    prompt's cost), and the store's recall@1 is 0.996 (benchmarks/bench_knowledge_latency.py,
    bench_retrieval.py)."""
    threshold: Annotated[float, Range(ge=-1, le=1)] = 0.3
    """Minimum relevance of a retrieved passage (the cosine with an encoder, else BM25 over its
    ceiling, which runs lower: about 0.1-0.5 for a match); below it a passage stays out of the
    prompt. With MiniLM, questions about stored documents scored 0.47-0.92 and unrelated ones
    0.00-0.24."""
    budget: Annotated[int, Range(ge=16)] = 1024
    """Tokens the prompt may take with its passages; the lowest-scored ones are dropped to fit."""
