"""`knowledge.ingest=true`: every document the learner reads enters the run's store, once."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from herllm.acquire.sources import WAIT, Document
from herllm.config import build_config
from herllm.memory.knowledge import KnowledgeStore, Scope
from herllm.memory.knowledge.ingest import StreamIngest, document_text, run_scope, source_of
from herllm.run.learner import Learner

WORDS = "river lamp ledger valley keeper window rain stone bread salt wind".split()


def note(i: int, words: int = 40) -> str:
    return f"Note {i}. " + " ".join(WORDS[(i * 3 + k) % len(WORDS)] for k in range(words)) + "."


def test_each_document_is_ingested_once_even_when_read_again(tmp_path):
    docs = [Document(f"notes.txt#{i}", note(i)) for i in range(5)]
    scope = Scope("run", "r")
    with KnowledgeStore(tmp_path / "k.sqlite") as store:
        first = StreamIngest(store, scope, 5, 10)
        assert list(first([docs[0], WAIT, *docs[1:3]])) == [docs[0], WAIT, *docs[1:3]]
        again = StreamIngest(store, scope, 5, 10)  # a resumed run reads from the start again
        list(again(iter(docs)))
        assert (first.ingested, again.ingested) == (3, 2)
        items = store.list(scope)
        assert {it.doc_id for it in items} == {d.doc_id for d in docs}
        per_doc = {d.doc_id: [it for it in items if it.doc_id == d.doc_id] for d in docs}
        for d in docs:  # each passage once, its offsets slice the document's text
            assert len(per_doc[d.doc_id]) == len({it.offsets for it in per_doc[d.doc_id]}) > 1
            assert all(d.text[a:b] == it.text for it in per_doc[d.doc_id] for a, b in [it.offsets])
            assert {it.source for it in per_doc[d.doc_id]} == {"notes.txt"}
        forgotten = items[0]
        store.forget(forgotten.id)
        list(StreamIngest(store, scope, 5, 10)(iter(docs)))  # forgotten stays forgotten
        assert store.get(forgotten.id).status == "forgotten"
        assert len(store.list(scope)) == len(items) - 1


def test_provenance_of_chat_records_and_the_default_scope(tmp_path):
    assert document_text(Document("p.jsonl:4", "Q?", "A.")) == "Q?\n\nA."
    assert source_of("data/p.jsonl:4") == "data/p.jsonl" and source_of("a.txt#12") == "a.txt"
    assert run_scope("", tmp_path / "my-run") == Scope("run", "my-run")
    assert run_scope("user:alice", tmp_path) == Scope("user", "alice")


def small_run(tmp_path, model_dir, *extra):
    text = "\n\x1e\n".join(note(i, 30) for i in range(12))
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "s.txt").write_text(text)
    return build_config(None, [f"model.name_or_path={model_dir}", f"run_dir={tmp_path / 'run'}",
                               f"stream.sources=[{tmp_path / 's.txt'}]", "stream.seq_len=32",
                               "train.batch_size=4", "train.warmup_steps=1", *extra])  # fmt: skip


def test_the_learner_ingests_what_it_reads_only_when_asked(tmp_path, tiny_model_dir):
    off = small_run(tmp_path / "off", tiny_model_dir, "train.max_steps=2")
    with Learner(off, show_progress=False) as learner:
        learner.run()
    assert not (tmp_path / "off" / "run" / "knowledge.sqlite").exists()  # off by default
    on = small_run(tmp_path / "on", tiny_model_dir, "knowledge.ingest=true",
                   "knowledge.encoder=none", "knowledge.min_words=5", "knowledge.max_words=12")  # fmt: skip
    with Learner(on, show_progress=False) as learner:
        learner.run()
    with KnowledgeStore(tmp_path / "on" / "run" / "knowledge.sqlite") as store:
        items = store.list(Scope("run", "run"))
    src = str(tmp_path / "on" / "s.txt")
    assert {it.doc_id for it in items} == {f"{src}#{i}" for i in range(12)}
    assert {it.source for it in items} == {src}


# -- a SIGKILL mid-run, then --resume: every document in the store exactly once --------------


def _trainer_state(run: Path) -> dict | None:
    import torch

    from herllm.atomic import list_checkpoints

    ckpts = list_checkpoints(run / "checkpoints")
    try:
        return torch.load(ckpts[-1][1] / "trainer.pt", weights_only=False) if ckpts else None
    except (FileNotFoundError, RuntimeError, EOFError):
        return None  # pruned or being replaced while we looked


def _added_per_doc(db_path: Path) -> dict[str, int]:
    with sqlite3.connect(db_path) as db:
        rows = db.execute(
            "SELECT json_extract(detail, '$.doc_id'), count(*) FROM history "
            "WHERE action = 'add' GROUP BY 1"
        ).fetchall()
    return dict(rows)


@pytest.mark.slow
def test_ingest_is_exactly_once_across_a_sigkill_and_resume(tiny_model_dir, tmp_path):
    from herllm.memory.knowledge.passages import split_passages

    log, run = tmp_path / "notes.jsonl", tmp_path / "run"
    docs = [note(i, 24) for i in range(40)]
    log.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "herllm.cli", "adapt", "--quiet"]
    args = [str(log), "--model", str(tiny_model_dir), "--run-dir", str(run), "--seq-len", "32",
            "--batch-size", "2", "--set", "checkpoint.every_steps=2", "--set",
            "eval.every_steps=1000", "--set", "knowledge.ingest=true", "--set",
            "knowledge.encoder=none", "--set", "knowledge.min_words=4", "--set",
            "knowledge.max_words=8"]  # fmt: skip
    proc = subprocess.Popen([*cmd, *args], env=env)
    try:
        deadline = time.monotonic() + 240
        while (state := _trainer_state(run)) is None or state["step"] < 4:
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)  # wherever it is: some documents read after the ckpt
        proc.wait(timeout=30)
        partial = _added_per_doc(run / "knowledge.sqlite")
        assert 0 < len(partial) < len(docs)
        assert subprocess.run([*cmd, "--resume", str(run)], env=env, timeout=300).returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    added = _added_per_doc(run / "knowledge.sqlite")
    expected = {f"{log}:{i + 1}": len(split_passages(d, 4, 8)) for i, d in enumerate(docs)}
    assert added == expected  # every document, each passage added once: none lost, none twice
