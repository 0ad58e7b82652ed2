"""The knowledge store: passages with provenance and scope, versioned, searchable, forgettable.

Design
------
* One SQLite file (WAL, ``synchronous=FULL``, ``secure_delete=ON``), e.g.
  ``RUN_DIR/knowledge.sqlite``, with ``items`` (every version of every passage, with its
  embedding as a float32 blob), ``history`` (the audit log) and ``meta`` (schema version and
  the encoder's name). Every change is one ``BEGIN IMMEDIATE`` transaction that writes the
  item rows and their history events together, so a crash (even ``kill -9``) leaves either
  all of a change or none of it.
* Append-only and versioned: :meth:`update` adds version n+1 (``supersedes`` -> version n)
  and marks version n ``superseded``; it stays in the table and in :meth:`history`, and is
  never retrieved again. The only in-place changes are ``status``, ``retrieval_count``,
  ``consolidated_into``, and :meth:`forget`.
* :meth:`forget` removes the text and embedding of EVERY version of the item (a forgotten
  fact must not survive as its older version), then checkpoints the WAL with TRUNCATE
  (which waits, up to the 30 s busy timeout, for other connections' readers to move on);
  with ``secure_delete`` SQLite zeroes the freed bytes, so the text is gone from the file. The
  history keeps that it was forgotten, when and by whom; history never holds passage text.
* Scopes are never mixed: a search in ``user:alice`` sees only ``user:alice``'s items.
  ``agent`` and ``run`` scopes can be added to a search explicitly with ``share=``; a user
  scope can never be shared into another scope's search.
* The embedding encoder's name is written on the first write; opening the store with a
  different encoder is refused. A store first written without an encoder is BM25-only.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from herllm.errors import UserError
from herllm.memory.knowledge.passages import split_passages
from herllm.memory.knowledge.records import (
    ITEM_COLUMNS,
    SCHEMA,
    SCHEMA_VERSION,
    Event,
    Hit,
    Item,
    Scope,
    check_text,
    event_from_row,
    item_from_row,
    search_scopes,
    where_clause,
)
from herllm.memory.knowledge.retrieval import BM25, DEFAULT_MODE, Encoder, rank

NO_ENCODER = "none"


@dataclass(frozen=True)
class Candidates:
    """The active passages of some scopes, ready to score."""

    ids: list[str]
    texts: list[str]
    doc_ids: list[str | None]
    embeddings: np.ndarray | None  # (N, D) float32, None for a BM25-only store
    bm25: BM25


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


class KnowledgeStore:
    """mem0-style ``add / search / update / forget / history`` over one SQLite file."""

    def __init__(
        self,
        path: str | Path,
        encoder: Encoder | None = None,
        *,
        actor: str = "api",
        mode: str = DEFAULT_MODE,
    ):
        self.path = Path(path)
        self.encoder, self.actor, self.mode = encoder, actor, mode
        self._lock = threading.RLock()
        self._cache: dict[tuple, Candidates] = {}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(
            self.path, timeout=30.0, isolation_level=None, check_same_thread=False
        )
        try:
            self._conn.execute("PRAGMA journal_mode=WAL")
            for pragma in ("synchronous=FULL", "secure_delete=ON", "foreign_keys=ON"):
                self._conn.execute(f"PRAGMA {pragma}")
            self._conn.executescript(SCHEMA)
            self._check_meta()
        except sqlite3.DatabaseError as exc:
            self._conn.close()
            raise UserError(
                f"knowledge store {self.path} is not a readable SQLite store ({exc}); "
                "give another --store path"
            ) from None

    # ---- lifecycle ---------------------------------------------------------------------

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> KnowledgeStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _meta(self) -> dict[str, str]:
        return dict(self._conn.execute("SELECT key, value FROM meta"))

    def _check_meta(self) -> None:
        with self._tx() as c:
            c.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        meta = self._meta()
        if meta["schema"] != str(SCHEMA_VERSION):
            raise UserError(
                f"knowledge store {self.path} has schema {meta['schema']}, this herllm reads "
                f"{SCHEMA_VERSION}: upgrade herllm or use a new --store path"
            )
        stored = meta.get("encoder")
        if stored is not None and self.encoder is not None and stored != self.encoder.name:
            spec = meta.get("encoder_spec", stored)
            raise UserError(
                f"knowledge store {self.path} was embedded with encoder {stored!r}, not "
                f"{self.encoder.name!r}: open it with --encoder {spec} or build a new store"
            )

    def _claim_encoder(self, c: sqlite3.Connection) -> None:
        name = NO_ENCODER if self.encoder is None else self.encoder.name
        spec = NO_ENCODER if self.encoder is None else getattr(self.encoder, "spec", name)
        c.execute("INSERT OR IGNORE INTO meta VALUES ('encoder', ?)", (name,))
        c.execute("INSERT OR IGNORE INTO meta VALUES ('encoder_spec', ?)", (spec,))

    def _embed(self, texts: Sequence[str]) -> np.ndarray | None:
        if self.encoder is not None:
            return self.encoder.encode(texts).astype(np.float32)
        stored = self._meta().get("encoder", NO_ENCODER)
        if stored != NO_ENCODER:
            raise UserError(
                f"knowledge store {self.path} holds {stored!r} embeddings: open it with that "
                "encoder to add or to search densely (or search with mode bm25)"
            )
        return None

    # ---- writes ------------------------------------------------------------------------

    def _insert(self, c: sqlite3.Connection, *, action: str, detail: dict, **f) -> str:
        ident = uuid.uuid4().hex[:16]
        root = f.get("root_id") or ident
        start, end = f["offsets"] if f.get("offsets") else (None, None)
        blob = None if f["vec"] is None else np.asarray(f["vec"], dtype=np.float32).tobytes()
        scope: Scope = f["scope"]
        c.execute(
            f"INSERT INTO items ({ITEM_COLUMNS}, embedding) VALUES "
            "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'active', ?, ?, 0, NULL, ?)",
            (ident, f["text"], scope.kind, scope.id, f["doc_id"], start, end, f["source"],
             _now(), f["version"], f.get("supersedes"), root, blob),
        )  # fmt: skip
        self._event(c, action, ident, root, f["version"], scope, f["actor"], detail)
        return ident

    def _event(self, c, action, item_id, root, version, scope: Scope, actor, detail) -> None:
        c.execute(
            "INSERT INTO history (time, action, item_id, root_id, version, scope_kind, scope_id,"
            " actor, detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (_now(), action, item_id, root, version, scope.kind, scope.id,
             actor or self.actor, json.dumps(detail, sort_keys=True)),
        )  # fmt: skip

    def _add_many(self, rows: list[dict], actor: str | None) -> list[Item]:
        vecs = self._embed([r["text"] for r in rows])
        with self._tx() as c:
            self._claim_encoder(c)
            ids = [
                self._insert(
                    c,
                    action="add",
                    version=1,
                    actor=actor,
                    vec=None if vecs is None else vecs[i],
                    detail={"doc_id": r["doc_id"], "source": r["source"]},
                    **r,
                )  # fmt: skip
                for i, r in enumerate(rows)
            ]
        return [self.get(i) for i in ids]

    def add(
        self,
        text: str,
        *,
        scope: Scope,
        doc_id: str | None = None,
        source: str = "api",
        offsets: tuple[int, int] | None = None,
        actor: str | None = None,
    ) -> Item:
        """Store one passage (version 1) in ``scope``."""
        check_text(text, "add")
        if offsets is not None and not 0 <= offsets[0] < offsets[1]:
            raise UserError(f"offsets {offsets}: need 0 <= start < end")
        row = dict(text=text, scope=scope, doc_id=doc_id, source=source, offsets=offsets)
        return self._add_many([row], actor)[0]

    def ingest_document(
        self,
        text: str,
        doc_id: str,
        scope: Scope,
        source: str = "api",
        *,
        min_words: int = 100,
        max_words: int = 200,
        actor: str | None = None,
    ) -> list[Item]:
        """Split ``text`` into passages (offsets kept) and add them in ONE transaction."""
        check_text(text, f"document {doc_id}")
        rows = [
            dict(text=p.text, scope=scope, doc_id=doc_id, source=source, offsets=(p.start, p.end))
            for p in split_passages(text, min_words, max_words)
        ]
        return self._add_many(rows, actor)

    def update(
        self, item_id: str, new_text: str, *, source: str | None = None, actor: str | None = None
    ) -> Item:
        """Version n+1 of an active item; version n becomes ``superseded`` (kept, unretrieved)."""
        check_text(new_text, "update")
        vec = self._embed([new_text])
        with self._tx() as c:
            old = self._get(c, item_id)
            if old.status != "active":
                raise UserError(
                    f"knowledge item {item_id} is {old.status}: update the active version "
                    f"(`herllm knowledge history {item_id}` shows it)"
                )
            c.execute("UPDATE items SET status = 'superseded' WHERE id = ?", (item_id,))
            new_id = self._insert(
                c, action="update", version=old.version + 1, actor=actor,
                vec=None if vec is None else vec[0], text=new_text, scope=old.scope,
                doc_id=old.doc_id, source=source or old.source, offsets=None,
                supersedes=old.id, root_id=old.root_id, detail={"supersedes": old.id},
            )  # fmt: skip
            self._event(
                c, "supersede", old.id, old.root_id, old.version, old.scope, actor, {"by": new_id}
            )
        return self.get(new_id)

    def forget(self, item_id: str, *, actor: str | None = None) -> list[str]:
        """Erase the text and embedding of every version of the item; returns their ids."""
        with self._tx() as c:
            root = self._get(c, item_id).root_id
            rows = c.execute(
                "SELECT id, version, scope_kind, scope_id, status FROM items "
                "WHERE root_id = ? AND status != 'forgotten' ORDER BY version",
                (root,),
            ).fetchall()
            if not rows:
                raise UserError(f"knowledge item {item_id} is already forgotten")
            c.execute(
                "UPDATE items SET text = NULL, embedding = NULL, status = 'forgotten' "
                "WHERE root_id = ?",
                (root,),
            )
            for ident, version, kind, scope_id, status in rows:
                scope = Scope(kind, scope_id)
                self._event(c, "forget", ident, root, version, scope, actor, {"was": status})
        # Move the zeroed pages into the main file and empty the WAL, which held the text.
        self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return [r[0] for r in rows]

    def set_consolidated(self, item_id: str, into: str | None, *, actor: str | None = None) -> Item:
        """Record that a ledger unit / entry absorbed this item."""
        with self._tx() as c:
            item = self._get(c, item_id)
            c.execute("UPDATE items SET consolidated_into = ? WHERE id = ?", (into, item_id))
            self._event(
                c, "consolidate", item.id, item.root_id, item.version, item.scope, actor,
                {"into": into},
            )  # fmt: skip
        return self.get(item_id)

    # ---- reads -------------------------------------------------------------------------

    def _get(self, c: sqlite3.Connection, item_id: str) -> Item:
        row = c.execute(f"SELECT {ITEM_COLUMNS} FROM items WHERE id = ?", (item_id,)).fetchone()
        if row is None:
            raise UserError(
                f"no knowledge item {item_id!r} in {self.path}: `herllm knowledge list` shows ids"
            )
        return item_from_row(row)

    def get(self, item_id: str) -> Item:
        with self._lock:
            return self._get(self._conn, item_id)

    def list(self, scope: Scope | None = None, *, status: str | None = "active") -> list[Item]:
        """Items in creation order; ``status=None`` lists every version."""
        clause, args = where_clause(scope=scope, status=status)
        sql = f"SELECT {ITEM_COLUMNS} FROM items {clause} ORDER BY created, rowid"
        with self._lock:
            return [item_from_row(r) for r in self._conn.execute(sql, args)]

    def doc_ids(self, scope: Scope) -> set[str]:
        """Document ids with an item of any status in ``scope`` (forgotten ones included)."""
        sql = "SELECT DISTINCT doc_id FROM items WHERE scope_kind = ? AND scope_id = ?"
        with self._lock:
            rows = self._conn.execute(sql, (scope.kind, scope.id)).fetchall()
        return {r[0] for r in rows if r[0] is not None}

    def history(self, item_id: str | None = None, scope: Scope | None = None) -> list[Event]:
        """Every change (add, update, supersede, forget, consolidate) in order.
        With ``item_id``: the changes of every version of that item."""
        root = None if item_id is None else self.get(item_id).root_id
        clause, args = where_clause(scope=scope, root_id=root)
        sql = (
            "SELECT seq, time, action, item_id, root_id, version, scope_kind, scope_id, actor, "
            f"detail FROM history {clause} ORDER BY seq"
        )
        with self._lock:
            return [event_from_row(r) for r in self._conn.execute(sql, args)]

    def candidates(self, scopes: Sequence[Scope]) -> Candidates:
        """Active passages of exactly these scopes (cached until the next change)."""
        with self._lock:
            generation = self._conn.execute("SELECT max(seq) FROM history").fetchone()[0]
            key = (tuple(sorted(map(str, scopes))), generation)
            if key not in self._cache:
                self._cache = {key: self._load_candidates(scopes)}
            return self._cache[key]

    def _load_candidates(self, scopes: Sequence[Scope]) -> Candidates:
        match = " OR ".join("(scope_kind = ? AND scope_id = ?)" for _ in scopes)
        args = [v for s in scopes for v in (s.kind, s.id)]
        rows = self._conn.execute(
            f"SELECT id, text, doc_id, embedding FROM items WHERE status = 'active' AND ({match})"
            " ORDER BY rowid",
            args,
        ).fetchall()
        blobs = [r[3] for r in rows]
        dense = bool(rows) and all(b is not None for b in blobs)
        matrix = np.stack([np.frombuffer(b, dtype=np.float32) for b in blobs]) if dense else None
        texts = [r[1] for r in rows]
        return Candidates([r[0] for r in rows], texts, [r[2] for r in rows], matrix, BM25(texts))

    def search(
        self,
        query: str,
        *,
        scope: Scope,
        k: int = 5,
        threshold: float | None = None,
        share: Sequence[Scope] = (),
        mode: str | None = None,
    ) -> list[Hit]:
        """The ``k`` best active passages of ``scope`` (plus explicitly shared agent/run
        scopes) whose relevance is at least ``threshold``; their retrieval counts go up by one."""
        check_text(query, "search")
        if k < 1:
            raise UserError(f"k={k}: ask for at least one result (k >= 1)")
        cands = self.candidates(search_scopes(scope, share))
        if not cands.ids:
            return []
        if mode is None:  # a store written without an encoder has only BM25
            mode = self.mode if cands.embeddings is not None else "bm25"
        qvec = None if mode == "bm25" else self._embed([query])
        qvec = None if qvec is None else qvec[0]
        ranking = rank(query, qvec, cands.bm25, cands.embeddings, mode=mode)
        order = np.argsort(-ranking.scores, kind="stable")[:k]
        top = [i for i in order if threshold is None or ranking.relevance[i] >= threshold]
        ids = [cands.ids[i] for i in top]
        with self._tx() as c:
            c.executemany(
                "UPDATE items SET retrieval_count = retrieval_count + 1 "
                "WHERE id = ? AND status = 'active'",
                [(i,) for i in ids],
            )
            items = [self._get(c, i) for i in ids]
        pairs = zip(items, top, strict=True)
        return [
            Hit(it, float(ranking.scores[i]), float(ranking.relevance[i]))
            for it, i in pairs
            if it.status == "active"
        ]
