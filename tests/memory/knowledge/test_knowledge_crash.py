"""kill -9 during writes leaves the store consistent: every change is whole or absent."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from knowledge_test_encoder import HashEncoder

from herllm.memory.knowledge import KnowledgeStore, Scope, split_passages

HERE = Path(__file__).parent
SRC = Path(__file__).parents[3] / "src"

CHILD = """
import random, sys
sys.path[:0] = [{here!r}, {src!r}]
from knowledge_test_encoder import HashEncoder
from herllm.memory.knowledge import KnowledgeStore, Scope
from herllm.memory.knowledge.records import SCOPE_KINDS

def document(n):
    return " ".join(f"Sentence {{j}} of document {{n}} names the river Ael{{n}}." for j in range(150))

store = KnowledgeStore({path!r}, HashEncoder(), actor="child")
rng = random.Random({seed})
n = {start}
while True:
    scope = Scope("user", f"u{{n % 3}}")
    if n % 2 == 0:
        store.ingest_document(document(n), f"doc-{{n}}", scope, source="loop")
    else:
        item = store.add(f"Passage {{n}} about the harbour number {{n}}.", scope=scope)
        if rng.random() < 0.5:
            store.update(item.id, f"Passage {{n}} about the harbour, revised.")
        elif rng.random() < 0.3:
            store.forget(item.id)
    store.search("harbour", scope=scope, k=3)
    print(n, flush=True)
    n += 1
"""


def document(n: int) -> str:
    return " ".join(f"Sentence {j} of document {n} names the river Ael{n}." for j in range(150))


def _run_and_kill(path: Path, seed: int, start: int) -> int:
    """Start the writer, let it do some work, kill -9 it at a random moment."""
    code = CHILD.format(here=str(HERE), src=str(SRC), path=str(path), seed=seed, start=start)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env=env)
    done = 0
    while done < 8:
        line = child.stdout.readline()
        assert line, f"writer died early with code {child.wait()}"
        done += 1
    time.sleep(np.random.default_rng(seed).uniform(0.0, 0.05))
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    child.stdout.close()
    return start + 1000


def _check_consistent(path: Path) -> None:
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
    rows = conn.execute(
        "SELECT id, status, text, embedding, supersedes, doc_id FROM items"
    ).fetchall()
    by_id = {r[0]: r for r in rows}
    events = conn.execute("SELECT action, item_id FROM history").fetchall()
    created = [i for a, i in events if a in ("add", "update")]
    assert sorted(created) == sorted(by_id)  # each row has its one creating event
    for _, status, text, blob, supersedes, _ in rows:
        if status == "forgotten":
            assert text is None and blob is None
        else:
            assert text and len(blob) == HashEncoder.dim * 4
        if supersedes is not None:
            assert by_id[supersedes][1] in ("superseded", "forgotten")
            assert ("supersede", supersedes) in events
    superseded = [r[0] for r in rows if r[1] == "superseded"]
    successors = {r[4] for r in rows}
    assert all(s in successors for s in superseded)
    docs: dict[str, int] = {}
    for r in rows:
        if r[5] and r[5].startswith("doc-"):
            docs[r[5]] = docs.get(r[5], 0) + 1
    for doc_id, count in docs.items():  # a document is ingested whole or not at all
        assert count == len(split_passages(document(int(doc_id[4:])))), doc_id
    conn.close()


def test_kill_9_during_writes_leaves_the_store_consistent(tmp_path):
    path = tmp_path / "knowledge.sqlite"
    start = 0
    for seed in range(3):
        start = _run_and_kill(path, seed, start)
        _check_consistent(path)
    with KnowledgeStore(path, HashEncoder()) as store:  # reopens and keeps working
        item = store.add("After the crashes, the harbour is calm.", scope=Scope("user", "u0"))
        assert store.get(item.id).status == "active"
        assert len(store.list(status=None)) > 3 * 8
    _check_consistent(path)
