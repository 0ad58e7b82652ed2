"""The knowledge store: versions, forgetting, scopes, history, encoder identity."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest
from knowledge_test_encoder import HashEncoder

from herllm.errors import UserError
from herllm.memory.knowledge import KnowledgeStore, Scope, split_passages, stored_encoder

ALICE, BOB = Scope("user", "alice"), Scope("user", "bob")


@pytest.fixture
def store(tmp_path, hash_encoder):
    with KnowledgeStore(tmp_path / "knowledge.sqlite", hash_encoder, actor="tester") as s:
        yield s


def test_add_keeps_provenance_and_search_counts_retrievals(store):
    item = store.add(
        "Quellen is the capital of Zorbia.", scope=ALICE, doc_id="atlas", source="atlas.txt",
        offsets=(10, 43),
    )  # fmt: skip
    assert (item.version, item.status, item.offsets, item.doc_id) == (
        1,
        "active",
        (10, 43),
        "atlas",
    )
    assert item.source == "atlas.txt" and item.retrieval_count == 0 and item.root_id == item.id
    store.add("Alice keeps bees on the roof.", scope=ALICE)
    hits = store.search("capital of Zorbia", scope=ALICE, k=1)
    assert [h.item.id for h in hits] == [item.id]
    assert hits[0].item.retrieval_count == 1
    store.search("capital of Zorbia", scope=ALICE, k=1)
    assert store.get(item.id).retrieval_count == 2


def test_update_supersedes_old_version_kept_but_never_retrieved(store):
    old = store.add("The ferry to Lund leaves at nine.", scope=ALICE)
    new = store.update(old.id, "The ferry to Lund leaves at ten.")
    assert (new.version, new.supersedes, new.root_id) == (2, old.id, old.id)
    assert store.get(old.id).status == "superseded"
    assert store.get(old.id).text == "The ferry to Lund leaves at nine."  # kept in history
    for mode in ("dense", "bm25", "hybrid", "rrf"):
        hits = store.search("ferry to Lund leaves at nine", scope=ALICE, k=5, mode=mode)
        assert [h.item.id for h in hits] == [new.id], mode
    with pytest.raises(UserError, match="superseded"):
        store.update(old.id, "again")
    actions = [(e.action, e.item_id) for e in store.history(old.id)]
    assert actions == [("add", old.id), ("update", new.id), ("supersede", old.id)]


def _file_bytes(path) -> bytes:
    return b"".join(
        p.read_bytes() for p in (path, path.with_name(path.name + "-wal")) if p.exists()
    )


def test_forget_erases_every_version_from_the_file_and_from_search(store):
    secret = "Alice's locker code is 7-3-9-ZEBRA-PLUM. " * 120  # spans overflow pages too
    kept = "Bob's umbrella is orange with white dots."
    first = store.add(secret, scope=ALICE)
    second = store.update(first.id, secret.replace("PLUM", "FIG"))
    store.add(kept, scope=BOB)
    assert b"ZEBRA-PLUM" in _file_bytes(store.path)  # the check below can see text
    assert sorted(store.forget(second.id, actor="alice")) == sorted([first.id, second.id])
    for _ in ("while the store is open (a server keeps it open)", "after close"):
        raw = _file_bytes(store.path)
        assert b"ZEBRA" not in raw and b"locker code" not in raw
        assert kept.encode() in raw
        store.close()
    conn = sqlite3.connect(store.path)
    rows = conn.execute("SELECT status, text, embedding FROM items WHERE root_id = ?", (first.id,))
    assert rows.fetchall() == [("forgotten", None, None)] * 2
    conn.close()
    with KnowledgeStore(store.path, HashEncoder()) as reopened:
        assert reopened.search("locker code ZEBRA", scope=ALICE) == []
        forgets = [e for e in reopened.history(first.id) if e.action == "forget"]
        assert {e.item_id for e in forgets} == {first.id, second.id}
        assert {e.actor for e in forgets} == {"alice"}
        with pytest.raises(UserError, match="already forgotten"):
            reopened.forget(first.id)


def test_scopes_are_never_mixed(store):
    store.add("The password hint is the first cat.", scope=ALICE)
    bob_item = store.add("The password hint is the blue door.", scope=BOB)
    team = store.add("The password policy needs twelve characters.", scope=Scope("agent", "helper"))
    for mode in ("dense", "bm25", "hybrid", "rrf"):
        hits = store.search("password hint", scope=ALICE, k=10, mode=mode)
        assert {h.item.scope for h in hits} == {ALICE}, mode
    shared = store.search("password", scope=ALICE, k=10, share=[Scope("agent", "helper")])
    assert {h.item.scope for h in shared} == {ALICE, Scope("agent", "helper")}
    assert bob_item.id not in {h.item.id for h in shared} and team.id in {h.item.id for h in shared}
    with pytest.raises(UserError, match="user scopes are never mixed"):
        store.search("password", scope=ALICE, share=[BOB])
    assert [i.id for i in store.list(BOB)] == [bob_item.id]


def test_history_is_complete_ordered_and_free_of_text(store):
    a = store.add("Fact one about the harbour.", scope=ALICE)
    b = store.add("Fact two about the lighthouse.", scope=BOB)
    a2 = store.update(a.id, "Fact one about the new harbour.", actor="editor")
    store.set_consolidated(a2.id, "unit-3")
    store.forget(b.id)
    events = store.history()
    assert [e.seq for e in events] == sorted(e.seq for e in events)
    assert [(e.action, e.item_id) for e in events] == [
        ("add", a.id), ("add", b.id), ("update", a2.id), ("supersede", a.id),
        ("consolidate", a2.id), ("forget", b.id),
    ]  # fmt: skip
    assert [e.actor for e in events] == ["tester", "tester", "editor", "editor", "tester", "tester"]
    assert [e.time for e in events] == sorted(e.time for e in events)
    assert [e.action for e in store.history(scope=BOB)] == ["add", "forget"]
    assert store.get(a2.id).consolidated_into == "unit-3"
    conn = sqlite3.connect(store.path)
    details = " ".join(r[0] for r in conn.execute("SELECT detail FROM history"))
    assert "harbour" not in details and "lighthouse" not in details


def test_threshold_is_on_relevance(store):
    store.add("Owls nest in the old mill.", scope=ALICE)
    assert store.search("owls nest mill", scope=ALICE, threshold=0.5)
    assert store.search("quantum chromodynamics", scope=ALICE, threshold=0.5) == []
    hit = store.search("owls nest mill", scope=ALICE, mode="bm25")[0]
    assert 0.0 < hit.relevance < 1.0 and hit.score == pytest.approx(1.0)


def test_ingest_document_keeps_offsets(store, fk10):
    text = fk10[0]["train_context"]
    items = store.ingest_document(text, "fk-00", ALICE, source="fk.json")
    assert len(items) == len(split_passages(text)) >= 2
    for item in items:
        start, end = item.offsets
        assert text[start:end] == item.text and item.doc_id == "fk-00"
        assert 50 <= len(item.text.split()) <= 250


def test_another_encoder_is_refused(tmp_path, hash_encoder):
    path = tmp_path / "k.sqlite"
    with KnowledgeStore(path, hash_encoder) as s:
        s.add("Some fact.", scope=ALICE)
    assert stored_encoder(path) == ("hash-test-64", "hash")

    class Other(HashEncoder):
        name = "other-encoder"

    with pytest.raises(UserError, match="embedded with encoder 'hash-test-64'") as err:
        KnowledgeStore(path, Other())
    assert "\n" not in str(err.value)
    with KnowledgeStore(path) as admin:  # no encoder: admin and BM25 only
        assert len(admin.search("fact", scope=ALICE, mode="bm25")) == 1
        with pytest.raises(UserError, match="open it with that encoder"):
            admin.search("fact", scope=ALICE, mode="dense")


def test_store_without_encoder_is_bm25_only(tmp_path):
    with KnowledgeStore(tmp_path / "k.sqlite") as s:
        s.add("Tamsin rows the yellow boat.", scope=ALICE)
        s.add("Corwin bakes rye bread.", scope=ALICE)
        assert s.search("yellow boat", scope=ALICE, k=1)[0].item.text.startswith("Tamsin")
    with pytest.raises(UserError, match="embedded with encoder 'none'"):
        KnowledgeStore(tmp_path / "k.sqlite", HashEncoder())


def test_embeddings_are_float32_blobs_of_the_encoder(store, hash_encoder):
    item = store.add("Eleven lanterns light the bridge.", scope=ALICE)
    conn = sqlite3.connect(store.path)
    (blob,) = conn.execute("SELECT embedding FROM items WHERE id = ?", (item.id,)).fetchone()
    vec = np.frombuffer(blob, dtype=np.float32)
    np.testing.assert_allclose(vec, hash_encoder.encode([item.text])[0], rtol=1e-6)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda s: s.add("  ", scope=ALICE), "text is empty"),
        (lambda s: s.search("x", scope=ALICE, k=0), "k=0"),
        (lambda s: s.get("nope"), "no knowledge item 'nope'"),
        (lambda s: s.search("x", scope=ALICE, mode="fuzzy"), "unknown retrieval mode"),
        (lambda s: Scope("team", "x"), "scope kind 'team'"),
        (lambda s: Scope.parse("alice"), "write KIND:ID"),
    ],
)
def test_mistakes_are_one_line_user_errors(store, call, message):
    store.add("A fact so the store is not empty.", scope=ALICE)
    with pytest.raises(UserError, match=message) as err:
        call(store)
    assert "\n" not in str(err.value)


def test_not_a_store_file_is_a_user_error(tmp_path):
    path = tmp_path / "k.sqlite"
    path.write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(UserError, match="not a readable SQLite store"):
        KnowledgeStore(path)
