"""Two users and a planted fact; the hot swap of adapter versions under concurrent requests;
an admin rollback to an earlier version."""

from __future__ import annotations

import json
import threading
import time

import openai
from helpers import publish_version

from herllm.memory.knowledge import Scope

FACT = "My locker code is 73914 and nobody else knows it."
ASK = [{"role": "user", "content": "What is my locker code?"}]


def test_a_users_fact_is_used_for_them_at_once_and_never_for_another(live):
    alice, bob = (openai.OpenAI(base_url=live.url + "/v1", api_key=live.tokens[u], max_retries=0)
                  for u in ("alice", "bob"))  # fmt: skip
    first = alice.chat.completions.create(model="herllm-tiny", max_tokens=8, temperature=0,
                                          messages=[{"role": "user", "content": FACT}])  # fmt: skip
    stored = live.deps.store.list(Scope("user", "alice"))
    assert [i.text for i in stored] == [FACT] and stored[0].doc_id == first.id
    mine = alice.chat.completions.create(model="herllm-tiny", messages=ASK, max_tokens=8)
    assert mine.model_extra["herllm"]["facts"] == [stored[0].id]  # the very next request
    theirs = bob.chat.completions.create(model="herllm-tiny", messages=ASK, max_tokens=64,
                                         user="alice")  # the body's user changes nothing  # fmt: skip
    assert theirs.model_extra["herllm"]["facts"] == []
    assert "73914" not in theirs.choices[0].message.content
    assert live.deps.store.list(Scope("user", "bob")) == []
    rows = {r["id"]: r for r in live.deps.log.rows()}
    assert rows[theirs.id]["user"] == "bob" and json.loads(rows[theirs.id]["facts"]) == []
    assert "73914" not in rows[theirs.id]["prompt"]
    # bob's own statement stays his
    bob.chat.completions.create(model="herllm-tiny", max_tokens=4, messages=[
        {"role": "user", "content": "My locker code is 11111 here."}])  # fmt: skip
    again = alice.chat.completions.create(model="herllm-tiny", messages=ASK, max_tokens=8)
    assert again.model_extra["herllm"]["facts"] == [stored[0].id]


def expected_answers(live, versions: list[str]) -> dict[str, str]:
    """What each version answers to the probe, greedy, generated outside the server."""
    from herllm.infer.adapted import AdaptedModel
    from herllm.serve.versions import load_version

    out = {}
    for v in versions:
        m: AdaptedModel = load_version(live.run, None if v == "base" else int(v.split("-")[1]))
        text = "user: What does the river carry?\nassistant:"
        out[v] = m.generate(text, max_new_tokens=12)
    return out


def test_hot_swap_under_concurrent_requests_never_fails_or_mixes(live):
    versions = ["base", "step-0000001", "step-0000002", "step-0000003"]
    answers, errors, lock = [], [], threading.Lock()
    stop = threading.Event()

    def client_loop(i):
        c = openai.OpenAI(base_url=live.url + "/v1", api_key=live.tokens["bob"], max_retries=0)
        while not stop.is_set():
            try:
                kw = dict(model="herllm-tiny", max_tokens=12, temperature=0,
                          messages=[{"role": "user", "content": "What does the river carry?"}])  # fmt: skip
                if i % 2:
                    chunks = list(c.chat.completions.create(stream=True, **kw))
                    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
                    version = chunks[0].system_fingerprint
                else:
                    r = c.chat.completions.create(**kw)
                    text, version = r.choices[0].message.content, r.system_fingerprint
                with lock:
                    answers.append((version, text))
            except Exception as exc:  # noqa: BLE001 - every failure is reported below
                errors.append(exc)

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for step in (1, 2, 3):
        time.sleep(1.0)
        publish_version(live.run, step, seed=step)
    deadline = time.monotonic() + 30
    while live.deps.versions.current()[0] != versions[-1] and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)
    stop.set()
    for t in threads:
        t.join()
    assert errors == []
    expected = expected_answers(live, versions)
    assert len(set(expected.values())) == len(versions)  # the versions really differ
    seen = {v for v, _ in answers}
    assert {"base", "step-0000003"} <= seen and len(seen) >= 3
    for version, text in answers:  # each answer is wholly one version's
        assert text == expected[version], version
    assert live.deps.versions.swaps >= 3


def test_admin_rollback_pins_an_earlier_version_until_latest(live):
    root = openai.OpenAI(base_url=live.url + "/v1", api_key=live.tokens["root"], max_retries=0)
    publish_version(live.run, 1, seed=1)
    publish_version(live.run, 2, seed=2)
    live.deps.versions.refresh()
    ids = {m.id: m.model_extra for m in root.models.list().data}
    assert ids["herllm-tiny@step-0000002"]["serving"] and "herllm-tiny@step-0000001" in ids
    out = root.post("/admin/rollback", cast_to=object, body={"version": "step-0000001"})
    assert out == {"serving": "step-0000001", "pinned": "step-0000001"}
    publish_version(live.run, 3, seed=3)
    live.deps.versions.refresh()
    r = root.chat.completions.create(model="herllm-tiny", messages=ASK, max_tokens=2)
    assert r.system_fingerprint == "step-0000001"  # pinned: newer versions wait
    with __import__("pytest").raises(openai.NotFoundError):
        root.post("/admin/rollback", cast_to=object, body={"version": "step-0000099"})
    root.post("/admin/rollback", cast_to=object, body={"version": "latest"})
    r = root.chat.completions.create(model="herllm-tiny", messages=ASK, max_tokens=2)
    assert r.system_fingerprint == "step-0000003"
