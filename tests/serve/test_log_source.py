"""The interaction log as the learner's stream: feedback changes the training target, a
thumbs-down answer is not trained on, decisions are frozen, and the source waits while the
server has requests in flight."""

from __future__ import annotations

import json
import threading
import time

from herllm.acquire.follow import FollowedSources
from herllm.acquire.sources import WAIT, SourceStats
from herllm.serve.log import Exchange, InFlight, InteractionLog, server_busy
from herllm.serve.log_source import INFLIGHT_FILE, QUIET_S, LogSource


def add(log: InteractionLog, i: int, answer: str = "an answer", created: float | None = None):
    log.append(Exchange(f"chatcmpl-{i}", "chat", "alice", "herllm-tiny", "base",
                        [{"role": "user", "content": f"question {i}"}],
                        f"user: question {i}\nassistant:", answer, "stop", 5, 2,
                        created=created or time.time()))  # fmt: skip


def test_feedback_changes_the_training_target(tmp_path):
    log = InteractionLog(tmp_path / "interactions.sqlite")
    for i in range(4):
        add(log, i)
    assert log.feedback("chatcmpl-1", "alice", None, "The corrected answer.")["applies_to_training"]
    log.feedback("chatcmpl-2", "alice", "down", None)
    log.feedback("chatcmpl-3", "alice", "up", None)
    docs = list(LogSource(log.path).poll())
    assert [(d.doc_id, d.text, d.response) for d in docs] == [
        ("interactions.sqlite#chatcmpl-0", "user: question 0\nassistant:", " an answer"),
        ("interactions.sqlite#chatcmpl-1", "user: question 1\nassistant:", " The corrected answer."),
        ("interactions.sqlite#chatcmpl-3", "user: question 3\nassistant:", " an answer"),
    ]  # fmt: skip
    rows = {r["id"]: r for r in log.rows()}
    assert rows["chatcmpl-2"]["learn"] == "skip" and rows["chatcmpl-1"]["target"].endswith(
        "answer."
    )
    # frozen: late feedback is kept but no longer changes what is learned, and says so
    assert not log.feedback("chatcmpl-0", "alice", "down", None)["applies_to_training"]
    again = list(LogSource(log.path).poll())  # a resumed learner reads the same documents
    assert [d.doc_id for d in again] == [d.doc_id for d in docs]


def test_an_exchange_waits_for_its_feedback_window(tmp_path):
    log = InteractionLog(tmp_path / "interactions.sqlite")
    add(log, 0, created=time.time() - 100)
    add(log, 1)
    add(log, 2, created=time.time() - 100)  # after an unsettled row: waits too (order is kept)
    src = LogSource(log.path, settle=30)
    assert [d.doc_id.split("#")[1] for d in src.poll()] == ["chatcmpl-0"]
    log.feedback("chatcmpl-1", "alice", None, "Fixed.")
    assert [d.response for d in src.poll()] == [" Fixed.", " an answer"]
    assert list(src.poll()) == []


def test_followed_sources_dispatch_to_the_log_and_wait(tmp_path):
    log = InteractionLog(tmp_path / "interactions.sqlite")
    add(log, 0)
    it = iter(FollowedSources([str(log.path)], ["*"], [], "error", SourceStats()))
    assert next(it).doc_id.endswith("chatcmpl-0")
    assert next(it) is WAIT
    add(log, 1)
    assert next(it).doc_id.endswith("chatcmpl-1")


def test_the_source_waits_while_the_server_has_requests_in_flight(tmp_path):
    log = InteractionLog(tmp_path / "interactions.sqlite")
    add(log, 0)
    busy = InFlight(tmp_path / INFLIGHT_FILE)
    got = []
    with busy:
        assert server_busy(tmp_path / INFLIGHT_FILE)
        t = threading.Thread(target=lambda: got.extend(LogSource(log.path).poll()))
        t.start()
        time.sleep(0.5)
        assert got == [] and t.is_alive()  # the learner does not read (so not train) now
    t.join(timeout=10)
    assert len(got) == 1 and not server_busy(tmp_path / INFLIGHT_FILE)
    # a count left by a server that died (its pid is gone) is ignored
    (tmp_path / INFLIGHT_FILE).write_text(json.dumps({"in_flight": 3, "pid": 2**22 + 7}))
    assert not server_busy(tmp_path / INFLIGHT_FILE)


def test_followed_log_reports_the_server_busy(tmp_path):
    log = InteractionLog(tmp_path / "interactions.sqlite")
    followed = FollowedSources([str(log.path)], ["*"], [], "error", SourceStats())
    assert not followed.busy()
    with InFlight(tmp_path / INFLIGHT_FILE):
        assert followed.busy()
    assert followed.busy()  # until the traffic has paused for QUIET_S
    time.sleep(QUIET_S + 0.1)
    assert not followed.busy()


def test_the_learner_holds_its_steps_while_the_source_is_busy(tmp_path):
    """Windows already read are not trained while the source's owner is busy; they are once it
    is free (the learner yields to serving between steps, not only between reads)."""
    from herllm.acquire.follow import register_followed_kind
    from herllm.acquire.sources import Document
    from herllm.config import build_config
    from herllm.run.learner import Learner

    busy = threading.Event()
    busy.set()
    words = "river lamp ledger valley keeper window rain stone bread salt wind".split()
    docs = [Document(f"g{i}", " ".join(words[(i + k) % len(words)] for k in range(60)))
            for i in range(12)]  # fmt: skip

    def open_poll(_path, _followed):
        pending = list(docs)

        def poll():
            while pending:
                yield pending.pop(0)

        return poll

    register_followed_kind(lambda p: p.suffix == ".gatetest", open_poll, lambda _p: busy.is_set)
    feed = tmp_path / "in.gatetest"
    feed.write_text("")
    cfg = build_config(None, [f"run_dir={tmp_path / 'run'}", f"stream.sources=[{feed}]",
                              "stream.follow=true", "stream.follow_poll=0.1", "stream.seq_len=32",
                              "train.batch_size=2"])  # fmt: skip
    box: dict = {}

    def learn() -> None:  # the buffer's SQLite connection lives in the learner's thread
        with Learner(cfg, show_progress=False) as learner:
            box["learner"] = learner
            learner.run()

    t = threading.Thread(target=learn, daemon=True)
    t.start()
    deadline = time.monotonic() + 90
    while "learner" not in box and time.monotonic() < deadline:
        time.sleep(0.05)
    learner = box["learner"]
    try:
        while learner.s.counters["windows_read"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        assert learner.s.counters["windows_read"] > 0 and learner.s.step == 0  # read, held
        busy.clear()
        while learner.s.step < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        learner.stop()
        t.join(timeout=60)
    assert not t.is_alive() and learner.s.step >= 3 and learner.s.held_s >= 0.5


def test_the_learner_waits_for_a_pause_not_only_for_the_last_request(tmp_path):
    path = tmp_path / INFLIGHT_FILE
    with InFlight(path):
        pass  # a request just finished
    assert not server_busy(path) and server_busy(path, quiet=30.0)
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "t": time.time() - 60}))
    assert not server_busy(path, quiet=30.0)
