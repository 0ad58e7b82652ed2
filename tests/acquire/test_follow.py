"""A stream that can wait: followed sources say "nothing yet" (WAIT) as well as yield documents,
and `herllm adapt --follow` learns what arrives, once, across a SIGKILL and --resume."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from herllm.acquire.chunks import Packer
from herllm.acquire.follow import FollowedSources
from herllm.acquire.sources import WAIT, SourceStats
from herllm.atomic import list_checkpoints
from herllm.errors import UserError


def take(it, n: int) -> list:
    return [next(it) for _ in range(n)]


def test_a_growing_jsonl_file_yields_complete_lines_then_waits(tmp_path):
    f = tmp_path / "log.jsonl"
    f.write_text('{"text": "one"}\n{"text": "two"}\n{"text": "thr')  # the last line is unfinished
    it = iter(FollowedSources([str(f)], ["*"], [], "error", SourceStats()))
    got = take(it, 3)
    assert [d.text for d in got[:2]] == ["one", "two"] and got[2] is WAIT
    assert next(it) is WAIT  # nothing new
    with open(f, "a") as fh:
        fh.write('ee"}\n{"prompt": "q", "response": "a"}\n')
    three, four = take(it, 2)
    assert (three.text, three.doc_id) == ("three", f"{f}:3")
    assert (four.text, four.response, four.doc_id) == ("q", "a", f"{f}:4")
    assert next(it) is WAIT


def test_a_followed_folder_reads_new_files_once_in_the_order_first_seen(tmp_path):
    d = tmp_path / "inbox"
    d.mkdir()
    (d / "b.txt").write_text("bee")
    src = FollowedSources([str(d)], ["*.txt"], [], "error", SourceStats())
    it = iter(src)
    assert [x.text if x is not WAIT else x for x in take(it, 2)] == ["bee", WAIT]
    (d / "a.txt").write_text("ay")  # sorts before b.txt, but arrives after it
    (d / "skip.bin").write_text("no")  # not matched by the include glob
    assert [x.text if x is not WAIT else x for x in take(it, 2)] == ["ay", WAIT]
    # a resumed run reads the files in the order they were first seen, then what is new
    (d / "0.txt").write_text("zero")
    again = FollowedSources([str(d)], ["*.txt"], [], "error", SourceStats())
    again.load_state_dict(src.state_dict())
    assert [x.text for x in take(iter(again), 3)] == ["bee", "ay", "zero"]


def test_follow_refuses_stdin_and_missing_paths(tmp_path):
    with pytest.raises(UserError, match="not stdin"):
        FollowedSources(["-"], ["*"], [], "error", SourceStats())
    with pytest.raises(UserError, match="does not exist"):
        FollowedSources([str(tmp_path / "nope")], ["*"], [], "error", SourceStats())


def test_wait_flushes_the_part_filled_window(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    from herllm.acquire.sources import Document

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    packer = Packer(tok, seq_len=64)
    docs = [Document("d0", "The river carries"), WAIT, Document("d1", "what the mountain gives")]
    out = list(packer.windows(iter(docs)))
    assert out[1] is WAIT  # the first short document became its own window before the wait
    assert out[0].doc_id == "d0" and out[2].doc_id == "d1"
    assert packer.position.doc_index == 2 and packer.position.windows == 2


# -- end to end: herllm adapt --follow, documents appended while it runs, SIGKILL, --resume ------


def _docs(start: int, n: int) -> list[str]:
    words = "river lamp ledger valley keeper window rain stone bread salt wind".split()
    return [
        json.dumps({"text": f"note {i}: " + " ".join(words[(i * 3 + k) % len(words)] for k in range(40))})
        for i in range(start, start + n)
    ]  # fmt: skip


def _append(path: Path, lines: list[str]) -> None:
    with open(path, "a") as fh:
        fh.write("".join(line + "\n" for line in lines))


def _newest(run: Path) -> dict | None:
    ckpts = list_checkpoints(run / "checkpoints")
    if not ckpts:
        return None
    try:
        return torch.load(ckpts[-1][1] / "trainer.pt", weights_only=False)
    except (FileNotFoundError, RuntimeError, EOFError):
        return None  # pruned or being replaced while we looked


def _wait_for(run: Path, windows: int, proc, timeout: float = 240) -> None:
    """Until a checkpoint has read `windows` windows (the follower checkpoints while idle)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the followed run ended by itself"
        state = _newest(run)
        if state is not None and state["counters"]["windows_read"] >= windows:
            return
        time.sleep(0.2)
    raise AssertionError(f"no checkpoint with {windows} windows read within {timeout} s")


@pytest.mark.slow
def test_follow_learns_each_appended_document_once_across_a_sigkill(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    from herllm.acquire.chunks import tokenize_document
    from herllm.acquire.sources import Document

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    log, run = tmp_path / "notes.jsonl", tmp_path / "run"
    batches = [_docs(0, 6), _docs(6, 6), _docs(12, 6)]
    every = [json.loads(x)["text"] for b in batches for x in b]
    tokens = sum(len(tokenize_document(Document("d", t), tok)[0]) for t in every)  # [bos] t [eos]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "herllm.cli", "adapt", "--quiet", "--follow"]
    args = [str(log), "--model", str(tiny_model_dir), "--run-dir", str(run), "--seq-len", "32",
            "--batch-size", "4", "--strategy", "replay", "--set", "checkpoint.every_steps=3",
            "--set", "stream.follow_poll=0.2", "--set", "eval.every_steps=1000"]  # fmt: skip
    _append(log, batches[0])
    proc = subprocess.Popen([*base, *args], env=env)
    try:
        _wait_for(run, 1, proc)
        _append(log, batches[1])  # arrives while it runs
        time.sleep(1.0)
        proc.send_signal(signal.SIGKILL)  # wherever it is
        proc.wait(timeout=30)
        _append(log, batches[2])  # arrives while it is down
        proc = subprocess.Popen([*base, "--resume", str(run)], env=env)
        deadline = time.monotonic() + 240
        while True:  # until every token is read and checkpointed
            state = _newest(run)
            if state is not None and state["counters"]["tokens_streamed"] >= tokens:
                break
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)  # a clean stop: checkpoint, exit 0
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    state = _newest(run)
    assert state["counters"]["tokens_streamed"] == tokens  # every token once: none lost or twice
    with sqlite3.connect(run / "replay.sqlite") as db:
        keys = list(db.execute("SELECT doc_id, offset FROM rows"))
    assert len(keys) == len(set(keys))  # no window stored twice
    assert {d for d, _ in keys} == {f"{log}:{i + 1}" for i in range(len(every))}
