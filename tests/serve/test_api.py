"""The official openai client against a live server on localhost: chat, stream, completions,
models, errors, auth, feedback and the admin routes."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

MSG = [{"role": "user", "content": "What does the river carry?"}]  # a question: not stored


def test_chat_completion_follows_the_openai_schema_and_is_logged(live, client):
    r = client.chat.completions.create(model="herllm-tiny", messages=MSG, max_tokens=12,
                                       temperature=0, user="bob")  # fmt: skip
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")
    u = r.usage
    assert u.prompt_tokens > 0 and 0 < u.completion_tokens <= 12
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert r.system_fingerprint == "base"  # the adapter version that answered
    row = live.deps.log.get(r.id)
    assert row["user"] == "alice"  # the token's user; the body's user="bob" is ignored
    assert row["answer"] == r.choices[0].message.content and row["version"] == "base"
    assert json.loads(row["messages"]) == MSG
    assert row["prompt"].endswith("assistant:")  # herllm-tiny: plain role lines


def test_stream_sends_chunks_then_done_and_logs_the_same_answer(live, client):
    chunks = list(client.chat.completions.create(
        model="herllm", messages=MSG, max_tokens=16, temperature=0, stream=True,
        stream_options={"include_usage": True}))  # fmt: skip
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finish in (["stop"], ["length"])
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert len({c.id for c in chunks}) == 1
    assert live.deps.log.get(chunks[0].id)["answer"] == text
    same = client.chat.completions.create(
        model="herllm", messages=MSG, max_tokens=16, temperature=0
    )
    assert same.choices[0].message.content == text  # greedy: streamed == not streamed


def test_raw_stream_ends_with_done(live):
    body = {"model": "herllm-tiny", "messages": MSG, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", live.url + "/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {live.tokens['alice']}"}) as r:  # fmt: skip
        lines = [x for x in r.iter_lines() if x]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]" and all(x.startswith("data: ") for x in lines)


def test_completions_stop_and_models(live, client):
    r = client.completions.create(model="herllm-tiny", prompt="The river", max_tokens=8,
                                  temperature=0)  # fmt: skip
    assert r.object == "text_completion" and r.choices[0].text
    full = r.choices[0].text
    cut = client.completions.create(model="herllm-tiny", prompt="The river", max_tokens=8,
                                    temperature=0, stop=[full[2:4]])  # fmt: skip
    assert cut.choices[0].text == full[: full.index(full[2:4])]
    assert cut.choices[0].finish_reason == "stop"
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == "herllm-tiny" and "herllm-tiny@base" in ids


def test_sampling_with_a_seed_repeats(client):
    kw = dict(model="herllm-tiny", messages=MSG, max_tokens=10, temperature=0.9, top_p=0.9, seed=7)
    a = client.chat.completions.create(**kw).choices[0].message.content
    assert a == client.chat.completions.create(**kw).choices[0].message.content


@pytest.mark.parametrize("token", [None, "wrong-token"])
def test_no_or_wrong_token_is_401_and_nothing_is_logged(live, token):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    for method, path in [("POST", "/v1/chat/completions"), ("GET", "/v1/models"),
                         ("POST", "/v1/feedback"), ("POST", "/v1/admin/rollback")]:  # fmt: skip
        r = httpx.request(method, live.url + path, headers=headers, timeout=30,
                          json={"model": "herllm-tiny", "messages": MSG})  # fmt: skip
        assert r.status_code == 401, path
        assert r.json()["error"]["code"] == "invalid_api_key"
    bad = openai.OpenAI(base_url=live.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="herllm-tiny", messages=MSG)
    assert live.deps.log.rows() == []


def test_bad_requests_get_openai_errors_and_leave_no_row(live, client):
    cases = [
        (dict(model="gpt-4", messages=MSG), openai.NotFoundError, "model_not_found"),
        (dict(model="herllm-tiny", messages=[{"role": "user", "content": "x" * 40_000}]),
         openai.BadRequestError, "messages_too_long"),
        (dict(model="herllm-tiny", messages=MSG, max_tokens=100_000), openai.BadRequestError,
         "max_tokens_too_large"),
        (dict(model="herllm-tiny", messages=[{"role": "user", "content": "river " * 3000}],
              max_tokens=64), openai.BadRequestError, "context_length_exceeded"),
        (dict(model="herllm-tiny", messages=[{"role": "wizard", "content": "hi"}]),
         openai.BadRequestError, "invalid_value"),
        (dict(model="herllm-tiny", messages=[]), openai.BadRequestError, "invalid_value"),
        (dict(model="herllm-tiny", messages=MSG, n=3), openai.BadRequestError, "invalid_value"),
    ]  # fmt: skip
    for kw, error, code in cases:
        with pytest.raises(error) as info:
            client.chat.completions.create(**kw)
        assert info.value.body["code"] == code, kw
        assert info.value.body["type"] == "invalid_request_error"
    auth = {"Authorization": f"Bearer {live.tokens['alice']}", "Content-Type": "application/json"}
    r = httpx.post(live.url + "/v1/chat/completions", content=b"{not json", headers=auth)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(live.url + "/v1/chat/completions", content=b"x" * 1_100_000, headers=auth)
    assert r.status_code == 413
    assert live.deps.log.rows() == []


def test_health_and_metrics(live, client):
    client.chat.completions.create(model="herllm-tiny", messages=MSG, max_tokens=4)
    h = httpx.get(live.url + "/health").json()
    assert h["status"] == "ok" and h["version"] == "base" and h["in_flight"] == 0
    text = httpx.get(live.url + "/metrics").text
    assert 'herllm_requests_total{route="/v1/chat/completions",status="200"} 1.0' in text
    assert "herllm_time_to_first_token_seconds_bucket" in text
    assert 'herllm_adapter_version_info{version="base"} 1.0' in text
    assert "herllm_tokens_total" in text


def test_feedback_marks_the_row_and_only_for_its_owner(live, client):
    r = client.chat.completions.create(model="herllm-tiny", messages=MSG, max_tokens=4)
    fb = client.post("/feedback", cast_to=object, body={"id": r.id, "correction": "Rivers flow."})
    assert fb == {"id": r.id, "object": "feedback", "applies_to_training": True}
    client.post("/feedback", cast_to=object, body={"id": r.id, "rating": "down"})
    row = live.deps.log.get(r.id)
    assert row["rating"] == "down" and row["correction"] == "Rivers flow."
    bob = openai.OpenAI(base_url=live.url + "/v1", api_key=live.tokens["bob"], max_retries=0)
    with pytest.raises(openai.NotFoundError):  # bob cannot rate alice's exchange
        bob.post("/feedback", cast_to=object, body={"id": r.id, "rating": "up"})
    with pytest.raises(openai.BadRequestError):
        client.post("/feedback", cast_to=object, body={"id": r.id})
    assert live.deps.log.get(r.id)["rating"] == "down"


def test_admin_routes_need_an_admin_token(live, client):
    with pytest.raises(openai.PermissionDeniedError):
        client.post("/admin/rollback", cast_to=object, body={"version": "base"})
    root = openai.OpenAI(base_url=live.url + "/v1", api_key=live.tokens["root"], max_retries=0)
    client.chat.completions.create(model="herllm-tiny", messages=MSG, max_tokens=4)
    export = httpx.get(live.url + "/v1/admin/export?user=alice",
                       headers={"Authorization": f"Bearer {live.tokens['root']}"}).text  # fmt: skip
    assert [json.loads(x)["user"] for x in export.splitlines()] == ["alice"]
    out = root.post("/admin/forget", cast_to=object, body={"user": "alice"})
    assert out["exchanges_deleted"] == 1 and live.deps.log.rows() == []


def test_a_long_statement_is_stored_as_passages_not_dropped(live, client):
    from herllm.memory.knowledge import Scope

    sentences = [f"The keeper of lamp {i} on the northern cliff of Vell lights it at dusk."
                 for i in range(32)]  # fmt: skip
    text = " ".join(sentences)
    assert len(text) > 2000
    client.chat.completions.create(model="herllm-tiny", max_tokens=2,
                                   messages=[{"role": "user", "content": text}])  # fmt: skip
    items = live.deps.store.list(Scope("user", "alice"))
    assert len(items) > 1 and all(it.source == "chat" for it in items)
    assert " ".join(it.text for it in items).split() == text.split()  # every word, once
