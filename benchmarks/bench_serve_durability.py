"""Durability of `herllm serve` and its learner: kill -9 of the server and of the learner at
random points under load; every acknowledged exchange is in the log exactly once afterwards,
and the learner resumes where it stopped.

One run made as `herllm serve NEW_DIR --model MODEL` makes it (`stream.seq_len=64`, a short
`--settle` so exchanges become trainable quickly), the server (`herllm serve RUN --encoder
none`) and the learner (`herllm adapt --follow RUN --quiet`) as two subprocesses, both with
OMP_NUM_THREADS=1. `--clients` threads send chat completions (streamed and not, a few tokens
each, a short pause between them) and now and then feedback (a thumbs-down or a correction) on
an answer they got. The load comes in bursts (`--burst MIN MAX` seconds) between quiet gaps
(`--gap MIN MAX`): the learner reads and trains only in the pauses of the traffic, so a learner
kill can land mid-step. A completion counts as acknowledged when the client got a 200 and the whole
body (non-streamed) or `data: [DONE]` (streamed). At each of `--kills` points (seeded: the
targets are half server, half learner in a shuffled order; the delay is uniform in `--delay
MIN MAX` seconds from when the target was ready: the server answering /health, the learner
having the log open) the target gets SIGKILL and is started again while the load goes on.
Then the load stops, the learner drains the log (every settled exchange decided and its
documents read and checkpointed) and gets SIGTERM.

Checks (each pass / fail, with counts):
1. acked_in_log: every acknowledged completion id is in `interactions.sqlite` exactly once, and
   `PRAGMA integrity_check` is ok (on the log and on `replay.sqlite`).
2. no_duplicates: no completion id (and no `seq`) appears twice in the log; the rows that were
   logged but never acknowledged are at most the requests cut by a server kill.
3. learner_resumed: after the drain the learner's committed checkpoint (the one the replay
   buffer's commit names, which a resume loads) accounts for every trainable exchange exactly
   once: every row is decided; the cursor stands at the end of the last document
   (`doc_index` = number of rows with learn='train', offset 0, nothing pending); the cursor's
   and the counters' `tokens_streamed` equal the tokens of exactly those documents, tokenized as
   the learner does; its window count equals `windows_read`; the replay buffer holds no window
   (doc id, offset) twice, only windows of those documents, and its `offered` counter equals
   `windows_read`. The learner exits 0 on SIGTERM.
4. no_failed_requests: no request failed except those cut by a server kill (a transport error
   or a stream without `[DONE]` while the server was being killed). Connections refused while
   the server was down are retried and counted apart.
5. feedback_applied: feedback the server acknowledged with `applies_to_training: true` is what
   the learner decided (a correction is the target, a thumbs-down is skipped).

Usage:
    python benchmarks/bench_serve_durability.py --model herllm-tiny --kills 20 --seed 0 \
        --out /tmp/bench_serve_durability.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch

from herllm.acquire.chunks import tokenize_document
from herllm.atomic import checkpoint_name, list_checkpoints
from herllm.config import build_config
from herllm.serve.auth import add_token
from herllm.serve.learn import create_run, terminate
from herllm.serve.log import LOG_FILE
from herllm.serve.log_source import LogSource

STATEMENTS = ["The river carries stone to the sea", "The keeper writes the ledger at dawn",
              "Rain falls on the valley before noon", "Bread and salt lie on the table",
              "The lamp burns in the north window"]  # fmt: skip
QUESTIONS = ["What does the river carry?", "Who keeps the ledger?", "Where does the rain fall?",
             "What burns in the window?", "What lies on the table?"]  # fmt: skip
CORRECTIONS = ["The river carries stone.", "The keeper does.", "On the valley.", "The lamp."]


def child_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Child:
    """A subprocess that is killed and started again; its output goes to `log` (appended)."""

    def __init__(self, name: str, cmd: list[str], log: Path):
        self.name, self.cmd, self.log = name, cmd, log
        self.proc: subprocess.Popen | None = None
        self.started = 0.0
        self.starts = 0

    def start(self) -> None:
        with open(self.log, "ab") as out:
            out.write(f"\n=== start {self.starts} at {time.time():.3f}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT,
                                         env=child_env())  # fmt: skip
        self.started = time.monotonic()
        self.starts += 1

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def term(self, timeout: float = 120.0) -> int | None:
        if self.proc is None:
            return None
        return terminate(self.proc, timeout)

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""


@dataclass
class Tally:
    """What the clients saw, shared by their threads (under `lock`)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    acked: list[str] = field(default_factory=list)
    acked_streamed: int = 0
    cut: int = 0
    cut_feedback: int = 0
    refused_while_down: int = 0
    failed: list[str] = field(default_factory=list)
    feedback: list[dict] = field(default_factory=list)
    """Acknowledged feedback: id, rating, correction, applies_to_training."""


class Load:
    """`clients` threads sending chat completions (and feedback) to the server until `stop`.

    `epoch` counts server kills: a request that fails by a transport error (or a stream that
    ends without [DONE]) while the server is down, or after a kill that came after it started,
    was cut by that kill; any other failure is a failure."""

    def __init__(self, url: str, tokens: list[str], clients: int, seed: int, max_tokens: int,
                 pause: float, feedback_p: float, burst=(1.0, 3.0), gap=(0.8, 2.0)):  # fmt: skip
        self.url, self.tokens, self.max_tokens = url, tokens, max_tokens
        self.pause, self.feedback_p, self.burst, self.gap = pause, feedback_p, burst, gap
        self.open = threading.Event()
        """Set during a burst of load, clear in a quiet gap."""
        self.gate = threading.Thread(target=self.bursts, args=(seed,), daemon=True)
        self.tally = Tally()
        self.epoch = 0
        self.up = threading.Event()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.client, args=(i, seed), daemon=True)
                        for i in range(clients)]  # fmt: skip

    def server_killed(self) -> None:
        """Before the kill: the requests in flight now are cut by it."""
        with self.tally.lock:
            self.up.clear()
            self.epoch += 1

    def start(self) -> None:
        self.gate.start()
        for t in self.threads:
            t.start()

    def bursts(self, seed: int) -> None:
        rng = random.Random(seed + 7)
        while not self.stop.is_set():
            self.open.set()
            if self.stop.wait(rng.uniform(*self.burst)):
                break
            self.open.clear()
            self.stop.wait(rng.uniform(*self.gap))
        self.open.set()  # no client waits for a burst that will not come

    def finish(self) -> None:
        self.stop.set()
        self.up.set()  # a client waiting for the server wakes and sees `stop`
        self.open.set()
        for t in [*self.threads, self.gate]:
            t.join(timeout=120)

    def _outcome_of_error(self, epoch0: int, exc: Exception | None, what: str) -> str:
        with self.tally.lock:
            killed = self.epoch != epoch0 or not self.up.is_set()
        if killed and isinstance(exc, httpx.ConnectError):
            return "refused"
        if killed:
            return "cut"
        return f"failed: {what}: {type(exc).__name__ if exc else ''} {exc or ''}"[:300]

    def client(self, i: int, seed: int) -> None:
        rng = random.Random(seed * 1000 + i)
        token = self.tokens[i % len(self.tokens)]
        c, c_epoch = None, -1
        while not self.stop.is_set():
            self.open.wait()
            self.up.wait()
            if self.stop.is_set():
                break
            epoch0 = self.epoch
            if c is None or c_epoch != epoch0:  # a restarted server: fresh connections
                if c is not None:
                    c.close()
                c = httpx.Client(base_url=self.url, timeout=120,
                                 headers={"Authorization": f"Bearer {token}"})  # fmt: skip
                c_epoch = epoch0
            streamed = rng.random() < 0.5
            content = rng.choice(STATEMENTS + QUESTIONS) + f" ({i}.{rng.randrange(10**6)})"
            body = {"model": "herllm-tiny", "stream": streamed,
                    "max_tokens": rng.randint(2, self.max_tokens),
                    "messages": [{"role": "user", "content": content}]}  # fmt: skip
            outcome, ack = self.chat(c, body, epoch0)
            if ack is not None and self.feedback_p > 0 and rng.random() < self.feedback_p:
                self.send_feedback(c, ack, rng, epoch0)
            with self.tally.lock:
                t = self.tally
                if outcome == "acked":
                    t.acked.append(ack)
                    t.acked_streamed += streamed
                elif outcome == "cut":
                    t.cut += 1
                elif outcome == "refused":
                    t.refused_while_down += 1
                else:
                    t.failed.append(outcome)
            if outcome == "refused":
                time.sleep(0.05)
            elif self.pause > 0:
                time.sleep(rng.uniform(0, self.pause))
        if c is not None:
            c.close()

    def chat(self, c: httpx.Client, body: dict, epoch0: int) -> tuple[str, str | None]:
        try:
            if body["stream"]:
                with c.stream("POST", "/v1/chat/completions", json=body) as r:
                    if r.status_code != 200:
                        r.read()
                        return f"failed: HTTP {r.status_code}: {r.text[:200]}", None
                    lines = [x for x in r.iter_lines() if x]
                if lines and lines[-1] == "data: [DONE]":
                    return "acked", json.loads(lines[0][len("data: ") :])["id"]
                out = self._outcome_of_error(epoch0, None, f"stream without [DONE]: {lines[-2:]}")
                return out if out != "refused" else "cut", None
            r = c.post("/v1/chat/completions", json=body)
            if r.status_code != 200:
                return f"failed: HTTP {r.status_code}: {r.text[:200]}", None
            return "acked", r.json()["id"]
        except (httpx.HTTPError, ValueError) as exc:
            return self._outcome_of_error(epoch0, exc, "chat"), None

    def send_feedback(self, c: httpx.Client, ex_id: str, rng: random.Random, epoch0: int) -> None:
        if rng.random() < 0.5:
            fb = {"id": ex_id, "rating": "down"}
        else:
            fb = {"id": ex_id, "correction": rng.choice(CORRECTIONS)}
        try:
            r = c.post("/v1/feedback", json=fb)
            if r.status_code != 200:
                outcome = f"failed: feedback HTTP {r.status_code}: {r.text[:200]}"
            else:
                with self.tally.lock:
                    self.tally.feedback.append({**fb, **r.json()})
                return
        except httpx.HTTPError as exc:
            outcome = self._outcome_of_error(epoch0, exc, "feedback")
        with self.tally.lock:
            if outcome in ("cut", "refused"):
                self.tally.cut_feedback += 1
            else:
                self.tally.failed.append(outcome)


def wait_healthy(url: str, server: Child, timeout: float = 180.0) -> float:
    """Seconds until /health answers 200 (raises if the server dies or never answers)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if not server.alive():
            raise RuntimeError(f"the server exited ({server.proc.returncode}):\n{server.tail()}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"the server did not answer /health in {timeout} s:\n{server.tail()}")


def wait_reading(run: Path, learner: Child, timeout: float = 180.0) -> float:
    """Seconds until the learner has the log open (its loop is built; Linux /proc), measured
    from its start; elsewhere, 0 at once."""
    fd_dir = Path(f"/proc/{learner.proc.pid}/fd")
    if not fd_dir.parent.is_dir():
        return 0.0
    log = str((run / LOG_FILE).resolve())
    while time.monotonic() - learner.started < timeout:
        if not learner.alive():
            raise RuntimeError(f"the learner exited ({learner.proc.returncode}):\n{learner.tail()}")
        try:
            if any(os.readlink(fd) == log for fd in fd_dir.iterdir()):
                return time.monotonic() - learner.started
        except OSError:
            pass  # an fd closed while we looked
        time.sleep(0.1)
    raise RuntimeError(f"the learner did not open the log in {timeout} s:\n{learner.tail()}")


# -- the learner's side: documents, checkpoints ---------------------------------------------
def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # pruned or replaced while we looked


def newest_cursor(run: Path) -> dict | None:
    ckpts = list_checkpoints(run / "checkpoints")
    return read_json(ckpts[-1][1] / "cursor.json") if ckpts else None


def buffer_state(run: Path) -> dict | None:
    """The replay buffer's last commit (`step`, counters), as a resume reads it."""
    path = run / "replay.sqlite"
    if not path.is_file():
        return None
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        row = db.execute("SELECT value FROM meta WHERE key='state'").fetchone()
    return json.loads(row[0]) if row else None


class ReadingSource(LogSource):
    """The learner's source that only reads: it decides no row and waits for nobody."""

    def wait_for_server(self) -> None:
        pass

    def freeze_settled(self, now: float | None = None) -> int:
        return 0


class Documents:
    """The learner's documents of the log (rows decided `train`, in log order) and their token
    counts as the learner's packer tokenizes them; cached by id."""

    def __init__(self, run: Path):
        from transformers import AutoTokenizer

        from herllm.models.load import resolve_model_path

        cfg = build_config(str(run / "config.yaml"), [])
        self.run, self.chat_template = run, cfg.stream.chat_template
        self.tok = AutoTokenizer.from_pretrained(resolve_model_path(cfg.model.name_or_path))
        self.tokens: dict[str, int] = {}

    def undecided(self) -> int:
        with sqlite3.connect(self.run / LOG_FILE, timeout=30) as db:
            return db.execute("SELECT COUNT(*) FROM exchanges WHERE learn IS NULL").fetchone()[0]

    def current(self) -> list:
        """The documents a learner reads now: `LogSource.poll` over the rows decided so far."""
        src = ReadingSource(self.run / LOG_FILE)
        try:
            docs = list(src.poll())
        finally:
            src.conn.close()
        for d in docs:
            if d.doc_id not in self.tokens:
                self.tokens[d.doc_id] = len(tokenize_document(d, self.tok, self.chat_template)[0])
        return docs

    def total_tokens(self, docs) -> int:
        return sum(self.tokens[d.doc_id] for d in docs)


def newest_pending(run: Path) -> int | None:
    """Windows read but not yet trained in the newest checkpoint (None: none readable now)."""
    ckpts = list_checkpoints(run / "checkpoints")
    try:
        return len(torch.load(ckpts[-1][1] / "trainer.pt", weights_only=False).get("pending", []))
    except (IndexError, OSError, RuntimeError, EOFError):
        return None


def drain(run: Path, learner: Child, docs: Documents, timeout: float) -> dict:
    """Until every exchange is decided, the newest checkpoint's cursor stands past the last
    document and it holds no window read but not yet trained (the learner is idle with
    everything read, trained and checkpointed; a stop before that is no loss, since pending
    windows are in the checkpoint, but the end state would not be the one checked)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if not learner.alive():
            raise RuntimeError(f"the learner exited ({learner.proc.returncode}):\n"
                               f"{learner.tail()}")  # fmt: skip
        if docs.undecided() == 0:
            ds = docs.current()
            cur = newest_cursor(run)
            pos = (cur or {}).get("position", {})
            if (pos.get("doc_index") == len(ds) and pos.get("tokens", -1) >= docs.total_tokens(ds)
                    and newest_pending(run) == 0):  # fmt: skip
                return {"seconds": time.monotonic() - t0, "drained": True}
        time.sleep(0.5)
    return {"seconds": time.monotonic() - t0, "drained": False}


# -- the checks ------------------------------------------------------------------------------
def check_log(run: Path, tally: Tally) -> tuple[dict, dict, dict]:
    with sqlite3.connect(f"file:{run / LOG_FILE}?mode=ro", uri=True) as db:
        integrity = db.execute("PRAGMA integrity_check").fetchone()[0]
        rows = db.execute(
            "SELECT seq, id, learn, target, rating, correction FROM exchanges ORDER BY seq"
        ).fetchall()
    counts: dict[str, int] = {}
    for r in rows:
        counts[r[1]] = counts.get(r[1], 0) + 1
    acked = tally.acked
    missing = [a for a in acked if counts.get(a, 0) == 0]
    twice = [a for a in acked if counts.get(a, 0) > 1]
    c1 = {"pass": integrity == "ok" and not missing and not twice and len(set(acked)) == len(acked),
          "acked": len(acked), "acked_streamed": tally.acked_streamed,
          "acked_distinct": len(set(acked)), "missing": len(missing),
          "more_than_once": len(twice), "integrity_check": integrity,
          "missing_ids": missing[:10]}  # fmt: skip
    dup_ids = sorted(i for i, n in counts.items() if n > 1)
    seqs = [r[0] for r in rows]
    not_acked = len(set(counts) - set(acked))
    c2 = {"pass": not dup_ids and len(set(seqs)) == len(seqs) and not_acked <= tally.cut,
          "rows": len(rows), "duplicate_ids": len(dup_ids), "duplicate_seqs": len(seqs) - len(set(seqs)),
          "logged_not_acked": not_acked, "requests_cut": tally.cut}  # fmt: skip
    by_id = {r[1]: r for r in rows}
    wrong = []
    applied = 0
    for fb in tally.feedback:
        if not fb.get("applies_to_training"):
            continue
        applied += 1
        _seq, _id, learn, target, _rating, _corr = by_id.get(fb["id"], (None,) * 6)
        ok = (learn == "train" and target == fb["correction"]) if "correction" in fb else (
            learn == "skip"
        )  # fmt: skip
        if not ok:
            wrong.append({"id": fb["id"], "learn": learn, "target": target, "feedback": fb})
    c5 = {"pass": not wrong, "feedback_acked": len(tally.feedback), "applies_to_training": applied,
          "not_applied": len(wrong), "examples": wrong[:5]}  # fmt: skip
    return c1, c2, c5


def check_learner(run: Path, docs: Documents, exit_code: int | None) -> dict:
    undecided = docs.undecided()
    ds = docs.current()
    n_train, tokens = len(ds), docs.total_tokens(ds)
    state = buffer_state(run)
    committed = None if state is None else state["step"]
    ckpts = dict(list_checkpoints(run / "checkpoints"))
    out = {"exit_code": exit_code, "undecided_rows": undecided, "train_documents": n_train,
           "skipped_rows": None, "document_tokens": tokens, "committed_step": committed,
           "newest_checkpoint": checkpoint_name(max(ckpts)) if ckpts else None}  # fmt: skip
    with sqlite3.connect(f"file:{run / LOG_FILE}?mode=ro", uri=True) as db:
        out["skipped_rows"] = db.execute(
            "SELECT COUNT(*) FROM exchanges WHERE learn = 'skip'"
        ).fetchone()[0]
    if committed is None or committed not in ckpts:
        return {"pass": False, **out, "why": "no committed checkpoint"}
    path = ckpts[committed]
    cursor = json.loads((path / "cursor.json").read_text())
    pos = cursor["position"]
    trainer = torch.load(path / "trainer.pt", weights_only=False)
    counters = trainer["counters"]
    with sqlite3.connect(f"file:{run / 'replay.sqlite'}?mode=ro", uri=True) as db:
        buf_integrity = db.execute("PRAGMA integrity_check").fetchone()[0]
        keys = db.execute("SELECT doc_id, offset FROM rows").fetchall()
    doc_ids = {d.doc_id for d in ds}
    out |= {
        "step": trainer.get("step", committed), "cursor_doc_index": pos["doc_index"],
        "cursor_token_offset": pos["token_offset"], "cursor_tokens": pos["tokens"],
        "cursor_windows": pos["windows"], "tokens_streamed": counters["tokens_streamed"],
        "windows_read": counters["windows_read"], "tokens_trained": counters["tokens_trained"],
        "pending": len(trainer.get("pending", [])), "replay_rows": len(keys),
        "replay_duplicate_windows": len(keys) - len(set(keys)),
        "replay_foreign_docs": len({d for d, _ in keys} - doc_ids),
        "replay_offered": state["counters"]["offered"], "replay_integrity": buf_integrity,
    }  # fmt: skip
    conds = {
        "exit 0 on SIGTERM": exit_code == 0,
        "every row decided": undecided == 0,
        "committed checkpoint is the newest": committed == max(ckpts),
        "cursor at the end of the last document": pos["doc_index"] == n_train
        and pos["token_offset"] == 0
        and not trainer.get("pending"),
        "tokens_streamed == tokens of the documents": counters["tokens_streamed"] == tokens
        and pos["tokens"] == tokens,
        "cursor windows == windows_read": pos["windows"] == counters["windows_read"],
        "no replay window twice": len(keys) == len(set(keys)),
        "replay windows are the documents'": not out["replay_foreign_docs"],
        "replay offered == windows_read": state["counters"]["offered"] == counters["windows_read"],
        "replay integrity ok": buf_integrity == "ok",
    }
    out["failed_conditions"] = [k for k, ok in conds.items() if not ok]
    return {"pass": not out["failed_conditions"], **out}


# -- the run ---------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="herllm-tiny")
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--clients", type=int, default=3)
    ap.add_argument("--delay", type=float, nargs=2, default=(0.5, 4.0), metavar=("MIN", "MAX"),
        help="seconds to a kill, uniform, from the server answering /health or the learner "
        "having the log open after its start (default 0.5 4)")  # fmt: skip
    ap.add_argument("--max-tokens", type=int, default=12, help="most tokens a request asks")
    ap.add_argument("--pause", type=float, default=0.3,
                    help="a client's pause between requests, uniform in [0, PAUSE] s")  # fmt: skip
    ap.add_argument("--burst", type=float, nargs=2, default=(1.0, 3.0), metavar=("MIN", "MAX"),
                    help="seconds of load between quiet gaps, uniform (default 1 3)")  # fmt: skip
    ap.add_argument("--gap", type=float, nargs=2, default=(0.8, 2.0), metavar=("MIN", "MAX"),
                    help="seconds of a quiet gap without requests, uniform (default 0.8 2)")  # fmt: skip
    ap.add_argument("--feedback", type=float, default=0.15,
                    help="share of answers that get feedback (half down, half corrected)")  # fmt: skip
    ap.add_argument("--settle", type=float, default=0.5)
    ap.add_argument("--tail", type=float, default=3.0, help="seconds of load after the last kill")
    ap.add_argument("--drain-timeout", type=float, default=300.0)
    ap.add_argument("--work-dir", help="where the run goes (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the run folder (kept on failure)")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args(argv)

    t_start = time.monotonic()
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="herllm-durability-", dir=args.work_dir))
    run = root / "run"
    create_run(run, args.model, args.settle, extra=["stream.seq_len=64"])
    tokens = [add_token(run / "tokens.json", u) for u in ("alice", "bob")]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    py = [sys.executable, "-m", "herllm.cli"]
    server = Child("server", [*py, "serve", str(run), "--port", str(port), "--encoder", "none"],
                   root / "server.log")  # fmt: skip
    learner = Child(
        "learner", [*py, "adapt", "--follow", str(run), "--quiet"], root / "learner.log"
    )
    docs = Documents(run)
    load = Load(url, tokens, args.clients, args.seed, args.max_tokens, args.pause, args.feedback,
                tuple(args.burst), tuple(args.gap))  # fmt: skip
    targets = ["server"] * (args.kills // 2) + ["learner"] * (args.kills - args.kills // 2)
    rng.shuffle(targets)
    kills: list[dict] = []
    errors: list[str] = []
    startup = None
    learner_startups: list[float] = []
    print(f"run {run}; server on {url}; {args.kills} kills, seed {args.seed}", flush=True)
    try:
        server.start()
        learner.start()
        startup = wait_healthy(url, server)
        load.up.set()
        load.start()
        ready = {"server": time.monotonic(), "learner": None}
        for k, target in enumerate(targets):
            delay = rng.uniform(*args.delay)
            if ready[target] is None:  # the learner's start: from when it reads the log
                learner_startups.append(wait_reading(run, learner))
                ready["learner"] = time.monotonic()
            time.sleep(max(0.0, ready[target] + delay - time.monotonic()))
            for child in (server, learner):
                if not child.alive():
                    raise RuntimeError(f"the {child.name} exited by itself "
                                       f"({child.proc.returncode}):\n{child.tail()}")  # fmt: skip
            child = server if target == "server" else learner
            with load.tally.lock:
                acked_before = len(load.tally.acked)
            cur, committed = newest_cursor(run), buffer_state(run)
            with sqlite3.connect(run / LOG_FILE, timeout=30) as db:
                decided = db.execute("SELECT COUNT(*) FROM exchanges WHERE learn = 'train'")
                decided = decided.fetchone()[0]
            life = time.monotonic() - child.started
            if target == "server":
                load.server_killed()
            child.kill9()
            t_kill = time.monotonic()
            child.start()
            if target == "server":
                restart = wait_healthy(url, server)
                load.up.set()
                ready["server"] = time.monotonic()
            else:
                restart = 0.0
                ready["learner"] = None
            kills.append({"n": k + 1, "target": target, "delay_s": round(delay, 2),
                          "alive_s": round(life, 2), "at_s": round(t_kill - t_start, 1),
                          "restart_s": round(restart, 2), "acked_before": acked_before,
                          "cursor_doc_index": (cur or {}).get("position", {}).get("doc_index"),
                          "committed_step": (committed or {}).get("step"),
                          "train_rows_decided": decided})  # fmt: skip
            print(f"kill {k + 1:2d}/{len(targets)}: {target:7s} after {life:5.2f} s alive; "
                  f"{acked_before} acked so far; restarted in {restart:.1f} s", flush=True)  # fmt: skip
        time.sleep(args.tail)
    except Exception as exc:  # noqa: BLE001 - reported as a failed run with what was seen
        errors.append(f"{type(exc).__name__}: {exc}")
    load.finish()
    t_load_end = time.monotonic()
    drained = {"drained": False, "seconds": 0.0}
    if not errors:
        try:
            drained = drain(run, learner, docs, args.drain_timeout)
        except Exception as exc:  # noqa: BLE001
            errors.append(f"{type(exc).__name__}: {exc}")
    learner_exit = learner.term()
    server_exit = server.term()
    c1, c2, c5 = check_log(run, load.tally)
    c3 = check_learner(run, docs, learner_exit) | {"drain": drained}
    c3["pass"] = c3["pass"] and drained["drained"]
    t = load.tally
    c4 = {"pass": not t.failed, "requests_cut": t.cut, "feedback_cut": t.cut_feedback,
          "refused_while_down": t.refused_while_down, "failed": len(t.failed),
          "failures": t.failed[:10]}  # fmt: skip
    checks = {"acked_in_log": c1, "no_duplicates": c2, "learner_resumed": c3,
              "no_failed_requests": c4, "feedback_applied": c5}  # fmt: skip
    ok = not errors and all(c["pass"] for c in checks.values())
    result = {
        "benchmark": "serve_durability", "model": args.model, "seed": args.seed,
        "kills": {"total": len(kills), "server": sum(k["target"] == "server" for k in kills),
                  "learner": sum(k["target"] == "learner" for k in kills)},
        "acked_exchanges": len(t.acked), "requests_cut": t.cut, "checks": checks,
        "pass": ok, "errors": errors, "kill_points": kills,
        "server_startup_s": None if startup is None else round(startup, 2),
        "server_exit_on_sigterm": server_exit,
        "learner_startup_s": [round(x, 1) for x in learner_startups],
        "load_seconds": round(t_load_end - t_start, 1),
        "wall_seconds": round(time.monotonic() - t_start, 1),
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": os.cpu_count(), "torch": torch.__version__,
                    "date": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())},
        "run_dir": str(run),
    }  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1, default=str))
    print_summary(result)
    if ok and not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    else:
        print(f"run folder kept: {root} (server.log, learner.log)")
    return 0 if ok else 1


def print_summary(r: dict) -> None:
    k, ch = r["kills"], r["checks"]
    print(f"\n{k['total']} kills ({k['server']} server, {k['learner']} learner); "
          f"{r['acked_exchanges']} exchanges acknowledged; {r['requests_cut']} requests cut by "
          f"server kills; {r['wall_seconds']} s in all")  # fmt: skip
    c1, c2, c3, c4, c5 = (ch[n] for n in ch)
    lines = [
        ("acked_in_log", f"{c1['acked']} acked, {c1['missing']} missing, {c1['more_than_once']} "
         f"more than once, integrity {c1['integrity_check']}"),
        ("no_duplicates", f"{c2['rows']} rows, {c2['duplicate_ids']} duplicate ids, "
         f"{c2['logged_not_acked']} logged but not acked (<= {c2['requests_cut']} cut)"),
        ("learner_resumed", f"{c3['train_documents']} train documents ({c3['skipped_rows']} "
         f"skipped), {c3['document_tokens']} tokens; checkpoint step {c3.get('step')}: "
         f"tokens_streamed {c3.get('tokens_streamed')}, cursor doc {c3.get('cursor_doc_index')}"
         f"@{c3.get('cursor_token_offset')}, {c3.get('replay_rows')} replay rows "
         f"({c3.get('replay_duplicate_windows')} twice); exit {c3['exit_code']}; drained in "
         f"{c3['drain']['seconds']:.1f} s" + (f"; FAILED: {c3.get('failed_conditions') or c3.get('why')}"
                                              if not c3["pass"] else "")),
        ("no_failed_requests", f"{c4['failed']} failed, {c4['requests_cut']} chat + "
         f"{c4['feedback_cut']} feedback cut by server kills, {c4['refused_while_down']} "
         "refused while down (retried)"),
        ("feedback_applied", f"{c5['feedback_acked']} feedback acked, "
         f"{c5['applies_to_training']} said to apply, {c5['not_applied']} not applied"),
    ]  # fmt: skip
    for name, text in lines:
        print(f"  {'PASS' if ch[name]['pass'] else 'FAIL'}  {name}: {text}")
    for e in r["errors"]:
        print(f"  ERROR {e[:2000]}")
    print("PASS" if r["pass"] else "FAIL")


if __name__ == "__main__":
    sys.exit(main())
