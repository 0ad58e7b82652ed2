"""kill -9 of the server under load: every exchange a client saw complete is in the log, once."""

from __future__ import annotations

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
