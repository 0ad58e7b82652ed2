"""Every document the learner reads, into the run's knowledge store (`knowledge.ingest=true`).

`StreamIngest` wraps the document stream before it is dealt to ranks, on rank 0 only (the
store's one writer), so it sees every rank's documents. Each document becomes passages
(`KnowledgeStore.ingest_document`: one transaction per document, so a crash leaves all of a
document's passages or none) with provenance: the document id, character offsets into the
document's text and its source path.

Exactly once, across a crash and `--resume` too, without checkpointed state: a resumed run
reads its sources again from the start (the packer skips what the cursor says was learned, and
documents read after the last checkpoint are read again), so the ingest skips every document
whose id already has an item in the scope, whatever its status. A passage the user forgot
therefore stays forgotten when its document is read again. The ids in the scope are read once,
when the run starts; the store then holds the truth, so nothing needs to be in `trainer.pt`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from herllm.acquire.sources import WAIT, Document
from herllm.memory.knowledge.records import Scope
from herllm.memory.knowledge.store import KnowledgeStore

STORE_FILE = "knowledge.sqlite"
ACTOR = "learner"
_DOC_SUFFIX = re.compile(r"(#\d+|:\d+)$")  # `path#n` (text record) or `path:line` (JSONL)


def run_scope(scope: str, run_dir: str | Path) -> Scope:
    """The scope `knowledge.scope` names, or the run's own `run:<run directory name>`."""
    if scope:
        return Scope.parse(scope)
    return Scope("run", Path(run_dir).resolve().name)


def document_text(doc: Document) -> str:
    """What of a document goes into the store: its text; a prompt/response record's prompt and
    response, and a messages record's turns, joined by a blank line (offsets refer to this)."""
    if doc.response is not None:
        return f"{doc.text}\n\n{doc.response}"
    return doc.text


def source_of(doc_id: str) -> str:
    """The source path in a document id (`notes.jsonl:12` -> `notes.jsonl`)."""
    return _DOC_SUFFIX.sub("", doc_id) or doc_id


class StreamIngest:
    """Passes documents through, adding each new one to the store first (see module doc)."""

    def __init__(self, store: KnowledgeStore, scope: Scope, min_words: int, max_words: int):
        self.store, self.scope = store, scope
        self.min_words, self.max_words = min_words, max_words
        self.present = store.doc_ids(scope)
        """Document ids already in the scope: never ingested again."""
        self.ingested = 0
        """Documents this process added."""

    def __call__(self, docs) -> Iterator:
        for doc in docs:
            if doc is not WAIT:
                self.ingest(doc)
            yield doc

    def ingest(self, doc: Document) -> bool:
        """Add `doc`'s passages unless its id is in the scope already; True when added."""
        if doc.doc_id in self.present:
            return False
        text = document_text(doc)
        if text.strip():
            self.store.ingest_document(
                text, doc.doc_id, self.scope, source_of(doc.doc_id),
                min_words=self.min_words, max_words=self.max_words, actor=ACTOR,
            )  # fmt: skip
            self.ingested += 1
        self.present.add(doc.doc_id)
        return True

    def close(self) -> None:
        self.store.close()


def build_ingest(run_dir: str | Path, cfg) -> StreamIngest:
    """The ingest of a run from its `KnowledgeConfig` (loads the encoder)."""
    from herllm.memory.knowledge.retrieval import load_encoder

    encoder = None if cfg.encoder == "none" else load_encoder(cfg.encoder)
    store = KnowledgeStore(Path(run_dir) / STORE_FILE, encoder, actor=ACTOR)
    return StreamIngest(store, run_scope(cfg.scope, run_dir), cfg.min_words, cfg.max_words)
