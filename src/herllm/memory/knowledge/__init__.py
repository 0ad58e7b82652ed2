"""The knowledge store (issue #16): passages with provenance and scope, versioned, retrieval,
supersede / forget, audit history, and prompt building from retrieved passages."""

from herllm.memory.knowledge.passages import Passage, split_passages
from herllm.memory.knowledge.prompt import ModelInput, build_prompt
from herllm.memory.knowledge.records import Event, Hit, Item, Scope, stored_encoder
from herllm.memory.knowledge.retrieval import BM25, DEFAULT_ENCODER, Encoder, load_encoder
from herllm.memory.knowledge.store import KnowledgeStore

__all__ = [
    "BM25",
    "DEFAULT_ENCODER",
    "Encoder",
    "Event",
    "Hit",
    "Item",
    "KnowledgeStore",
    "ModelInput",
    "Passage",
    "Scope",
    "build_prompt",
    "load_encoder",
    "split_passages",
    "stored_encoder",
]
