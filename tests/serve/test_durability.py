"""kill -9 of the server under load: every exchange a client saw complete is in the log, once."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import httpx
import pytest
from helpers import free_port, make_run


@pytest.mark.slow
def test_kill_9_under_load_loses_no_acknowledged_exchange(tmp_path):
    run, tokens = make_run(tmp_path)
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen([sys.executable, "-m", "herllm.cli", "serve", str(run), "--port",
                             str(port), "--encoder", "none"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("the server did not start")
    acked, lock, stop = [], threading.Lock(), threading.Event()
    headers = {"Authorization": f"Bearer {tokens['alice']}"}

    def load(i: int) -> None:
        body = {"model": "herllm-tiny", "max_tokens": 8, "stream": i % 2 == 1,
                "messages": [{"role": "user", "content": f"Client {i} says the river is wide."}]}  # fmt: skip
        with httpx.Client(base_url=url, headers=headers, timeout=30) as c:
            while not stop.is_set():
                try:
                    if body["stream"]:
                        with c.stream("POST", "/v1/chat/completions", json=body) as r:
                            lines = [x for x in r.iter_lines() if x]
                        if r.status_code == 200 and lines[-1] == "data: [DONE]":
                            done = lines[1][6:]
                            ack = __import__("json").loads(done)["id"]
                        else:
                            continue
                    else:
                        r = c.post("/v1/chat/completions", json=body)
                        if r.status_code != 200:
                            continue
                        ack = r.json()["id"]
                except httpx.HTTPError:
                    return  # the server is gone
                with lock:
                    acked.append(ack)

    threads = [threading.Thread(target=load, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    while len(acked) < 12 and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # mid-load: requests are in flight
    proc.wait()
    stop.set()
    for t in threads:
        t.join(timeout=60)
    conn = sqlite3.connect(run / "interactions.sqlite")
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    logged = [r[0] for r in conn.execute("SELECT id FROM exchanges")]
    assert len(acked) >= 12
    for ex_id in acked:
        assert logged.count(ex_id) == 1, ex_id
    assert len(set(logged)) == len(logged)


# -- the learner: kill -9 mid-stream, then it resumes where it stopped ----------------------
def _newest_cursor(run) -> dict | None:
    from herllm.atomic import list_checkpoints

    ckpts = list_checkpoints(run / "checkpoints")
    try:
        return json.loads((ckpts[-1][1] / "cursor.json").read_text())
    except (IndexError, OSError, ValueError):
        return None  # none yet, or pruned while we looked


def _documents(run):
    """The learner's documents of the log so far (rows decided `train`, in log order)."""
    from herllm.serve.log_source import LogSource

    class Reading(LogSource):  # reads what is decided; decides nothing, waits for nobody
        def wait_for_server(self) -> None:
            pass

        def freeze_settled(self, now=None) -> int:
            return 0

    src = Reading(run / "interactions.sqlite")
    docs = list(src.poll())
    src.conn.close()
    return docs


@pytest.mark.slow
def test_kill_9_of_the_learner_mid_stream_resumes_where_it_stopped(tmp_path):
    from test_log_source import add
    from transformers import AutoTokenizer

    from herllm.acquire.chunks import tokenize_document
    from herllm.models.load import resolve_model_path
    from herllm.serve.log import InteractionLog

    run, _tokens = make_run(tmp_path)
    log = InteractionLog(run / "interactions.sqlite")
    words = "river lamp ledger valley keeper window rain stone bread salt".split()

    def answer(i: int) -> str:
        return " " + " ".join(words[(i * 3 + k) % len(words)] for k in range(12 + i % 9)) + "."

    for i in range(24):
        add(log, i, answer=answer(i))
    log.feedback("chatcmpl-5", "alice", "down", None)  # skipped
    log.feedback("chatcmpl-6", "alice", None, "The corrected answer.")
    stop, n = threading.Event(), [24]

    def trickle() -> None:  # the server goes on logging while the learner runs
        while not stop.wait(0.05):
            add(log, n[0], answer=answer(n[0]))
            n[0] += 1

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    cmd = [sys.executable, "-m", "herllm.cli", "adapt", "--follow", str(run), "--quiet"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    feeder = threading.Thread(target=trickle)
    try:
        deadline = time.monotonic() + 120
        while (_newest_cursor(run) or {}).get("position", {}).get("doc_index", 0) == 0:
            assert proc.poll() is None and time.monotonic() < deadline, "no first checkpoint"
            time.sleep(0.1)
        feeder.start()
        time.sleep(1.5)  # reading, training, checkpointing while rows arrive
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        stop.set()
        feeder.join()
        at_kill = _newest_cursor(run)["position"]["doc_index"]
        for _ in range(10):  # arrives while it is down
            add(log, n[0], answer=answer(n[0]))
            n[0] += 1
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while True:  # until every row is decided and read, and that is checkpointed
            undecided = [r for r in log.rows() if r["learn"] is None]
            position = (_newest_cursor(run) or {}).get("position", {})
            if not undecided and position.get("doc_index") == len(_documents(run)):
                break
            assert proc.poll() is None and time.monotonic() < deadline, "the learner stalled"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)  # a clean stop: checkpoint, exit 0
        out = proc.communicate(timeout=60)[0].decode()
        assert proc.returncode == 0, out[-2000:]
    finally:
        stop.set()
        if proc.poll() is None:
            proc.kill()
    import torch

    from herllm.atomic import list_checkpoints

    docs = _documents(run)
    rows = log.rows()
    assert len(rows) == n[0] and all(r["learn"] is not None for r in rows)
    assert len(docs) == n[0] - 1 and at_kill < len(docs)  # chatcmpl-5 skipped; some read after
    tok = AutoTokenizer.from_pretrained(resolve_model_path("herllm-tiny"))
    tokens = sum(len(tokenize_document(d, tok)[0]) for d in docs)
    with sqlite3.connect(run / "replay.sqlite") as db:
        committed = json.loads(db.execute("SELECT value FROM meta WHERE key='state'").fetchone()[0])
        keys = db.execute("SELECT doc_id, offset FROM rows").fetchall()
    ckpts = dict(list_checkpoints(run / "checkpoints"))
    assert committed["step"] == max(ckpts)  # what a resume loads is the newest checkpoint
    state = torch.load(ckpts[committed["step"]] / "trainer.pt", weights_only=False)
    position = _newest_cursor(run)["position"]
    # every trainable exchange read exactly once, across the kill: none lost, none twice
    assert (position["doc_index"], position["token_offset"]) == (len(docs), 0)
    assert state["counters"]["tokens_streamed"] == position["tokens"] == tokens
    assert state["counters"]["windows_read"] == position["windows"] == len(keys)
    assert len(keys) == len(set(keys))  # no window stored twice in the replay buffer
    assert {d for d, _ in keys} <= {d.doc_id for d in docs}
    assert committed["counters"]["offered"] == state["counters"]["windows_read"]
