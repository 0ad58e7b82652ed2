"""The knowledge store's records: scopes, items, hits, history events, and the SQL schema."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from herllm.errors import UserError

SCOPE_KINDS = ("user", "agent", "run")
STATUSES = ("active", "superseded", "forgotten")
SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    id TEXT PRIMARY KEY,
    root_id TEXT NOT NULL,              -- id of version 1: every version shares it
    version INTEGER NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('active', 'superseded', 'forgotten')),
    supersedes TEXT REFERENCES items(id),
    scope_kind TEXT NOT NULL CHECK (scope_kind IN ('user', 'agent', 'run')),
    scope_id TEXT NOT NULL,
    text TEXT,                          -- NULL once forgotten
    embedding BLOB,                     -- float32, NULL once forgotten or without an encoder
    doc_id TEXT,
    start_offset INTEGER,
    end_offset INTEGER,
    source TEXT NOT NULL,
    created TEXT NOT NULL,
    retrieval_count INTEGER NOT NULL DEFAULT 0,
    consolidated_into TEXT
);
CREATE INDEX IF NOT EXISTS items_scope ON items (scope_kind, scope_id, status);
CREATE INDEX IF NOT EXISTS items_root ON items (root_id);
CREATE TABLE IF NOT EXISTS history (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    time TEXT NOT NULL,
    action TEXT NOT NULL,               -- add | update | supersede | forget | consolidate
    item_id TEXT NOT NULL,
    root_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    scope_kind TEXT NOT NULL,
    scope_id TEXT NOT NULL,
    actor TEXT NOT NULL,
    detail TEXT NOT NULL                -- JSON; never the passage text
);
CREATE INDEX IF NOT EXISTS history_root ON history (root_id);
"""


@dataclass(frozen=True)
class Scope:
    """Who a passage belongs to: ``user:alice``, ``agent:helper`` or ``run:run-7``."""

    kind: str
    id: str

    def __post_init__(self) -> None:
        if self.kind not in SCOPE_KINDS:
            raise UserError(f"scope kind {self.kind!r}: use one of {', '.join(SCOPE_KINDS)}")
        if not self.id or not self.id.strip():
            raise UserError(f"scope {self.kind}: the id is empty; give e.g. {self.kind}:alice")

    @classmethod
    def parse(cls, text: str) -> Scope:
        kind, sep, ident = text.partition(":")
        if not sep:
            raise UserError(f"scope {text!r}: write KIND:ID, e.g. user:alice")
        return cls(kind, ident)

    def __str__(self) -> str:
        return f"{self.kind}:{self.id}"


@dataclass(frozen=True)
class Item:
    """One version of one passage, with its provenance."""

    id: str
    text: str | None
    """None once forgotten."""
    scope: Scope
    doc_id: str | None
    offsets: tuple[int, int] | None
    """(start, end) character offsets in the source document."""
    source: str
    """A file path, "chat" or "api"."""
    created: str
    """ISO-8601 UTC time of this version."""
    version: int
    status: str
    supersedes: str | None
    """The id of the version this one replaced."""
    root_id: str
    retrieval_count: int
    consolidated_into: str | None
    """Ledger unit / entry that absorbed this passage, filled by consolidation."""


@dataclass(frozen=True)
class Hit:
    """One search result."""

    item: Item
    score: float
    """The ranking score of the retrieval mode (larger is better)."""
    relevance: float
    """Absolute relevance that ``threshold`` applies to: the cosine similarity, or in mode
    ``bm25`` the BM25 score over its ceiling (both at most 1)."""


@dataclass(frozen=True)
class Event:
    """One change in the audit history; it never carries passage text."""

    seq: int
    time: str
    action: str
    item_id: str
    root_id: str
    version: int
    scope: Scope
    actor: str
    detail: dict = field(default_factory=dict)


ITEM_COLUMNS = (
    "id, text, scope_kind, scope_id, doc_id, start_offset, end_offset, source, created, "
    "version, status, supersedes, root_id, retrieval_count, consolidated_into"
)


def item_from_row(row: sqlite3.Row | tuple) -> Item:
    (ident, text, kind, scope_id, doc_id, start, end, source, created, version, status,
     supersedes, root_id, count, consolidated) = row  # fmt: skip
    offsets = None if start is None else (int(start), int(end))
    return Item(
        id=ident, text=text, scope=Scope(kind, scope_id), doc_id=doc_id, offsets=offsets,
        source=source, created=created, version=int(version), status=status,
        supersedes=supersedes, root_id=root_id, retrieval_count=int(count),
        consolidated_into=consolidated,
    )  # fmt: skip


def event_from_row(row: tuple) -> Event:
    seq, time, action, item_id, root_id, version, kind, scope_id, actor, detail = row
    return Event(
        seq=int(seq), time=time, action=action, item_id=item_id, root_id=root_id,
        version=int(version), scope=Scope(kind, scope_id), actor=actor, detail=json.loads(detail),
    )  # fmt: skip


def stored_encoder(path: str | Path) -> tuple[str, str] | None:
    """(name, spec) of the encoder a store file was built with; None if new or unset."""
    path = Path(path)
    if not path.is_file():
        return None
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = dict(conn.execute("SELECT key, value FROM meta WHERE key LIKE 'encoder%'"))
    except sqlite3.DatabaseError:
        return None
    finally:
        conn.close()
    return (rows["encoder"], rows.get("encoder_spec", "")) if "encoder" in rows else None


def check_text(text: str, what: str) -> None:
    if not isinstance(text, str) or not text.strip():
        raise UserError(f"knowledge {what}: the text is empty; give some text")


def where_clause(
    *, scope: Scope | None = None, status: str | None = None, root_id: str | None = None
) -> tuple[str, list]:
    """``WHERE ...`` (or "") and its arguments for the given filters."""
    clauses, args = [], []
    if scope is not None:
        clauses += ["scope_kind = ?", "scope_id = ?"]
        args += [scope.kind, scope.id]
    for column, value in (("status", status), ("root_id", root_id)):
        if value is not None:
            clauses.append(f"{column} = ?")
            args.append(value)
    return (f"WHERE {' AND '.join(clauses)}" if clauses else ""), args


def search_scopes(scope: Scope, share: Sequence[Scope]) -> list[Scope]:
    for extra in share:
        if extra.kind == "user":
            raise UserError(
                f"scope {extra} cannot be shared into a search of {scope}: user scopes are "
                "never mixed; share only agent:ID or run:ID"
            )
    return list(dict.fromkeys([scope, *share]))
