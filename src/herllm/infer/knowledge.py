"""A run's knowledge store as its answers read it (`AdaptedModel.generate`, `herllm generate`).

The store is RUN_DIR/knowledge.sqlite (`herllm knowledge add --run RUN`, or the learner's own
ingest with `knowledge.ingest=true`), opened with the encoder it was built with. Scopes:

* no user: the run's scope (`knowledge.scope`, by default `run:<run directory name>`), where
  the learner ingests what it reads;
* `user="alice"`: `user:alice`'s passages, plus the run's scope when that is a run or agent
  scope (the run's documents are common to its users; a user's own passages never reach
  another user's answers: the store refuses to share user scopes).
"""

from __future__ import annotations

from pathlib import Path

from herllm.memory.knowledge.ingest import STORE_FILE, run_scope
from herllm.memory.knowledge.records import Hit, Scope, stored_encoder
from herllm.memory.knowledge.store import KnowledgeStore


class RunKnowledge:
    """Retrieval from a run's store with the run's `KnowledgeConfig` defaults."""

    def __init__(self, store: KnowledgeStore, scope: Scope, k: int, threshold: float, budget: int):
        self.store, self.scope = store, scope
        self.k, self.threshold, self.budget = k, threshold, budget

    @classmethod
    def open(cls, run_dir: str | Path, cfg) -> RunKnowledge | None:
        """The run's store, None when the run has none (answers are then as without it)."""
        from herllm.memory.knowledge.retrieval import load_encoder

        path = Path(run_dir) / STORE_FILE
        if not path.is_file():
            return None
        stored = stored_encoder(path)
        spec = stored[1] if stored else "none"
        encoder = None if spec in ("none", "") else load_encoder(spec)
        store = KnowledgeStore(path, encoder, actor="generate")
        return cls(store, run_scope(cfg.scope, run_dir), cfg.k, cfg.threshold, cfg.budget)

    def scopes(self, user: str | None) -> tuple[Scope, list[Scope]]:
        """The scope searched and the scopes shared into it (module doc)."""
        if user is None:
            return self.scope, []
        share = [self.scope] if self.scope.kind != "user" else []
        return Scope("user", user), share

    def search(self, query: str, user: str | None = None, k: int | None = None) -> list[Hit]:
        scope, share = self.scopes(user)
        return self.store.search(
            query, scope=scope, k=self.k if k is None else k, threshold=self.threshold, share=share
        )

    def close(self) -> None:
        self.store.close()
