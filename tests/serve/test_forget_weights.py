"""The admin forget reaches the weights: a user's fact that a consolidation distilled into the
adapter is rolled back out of it, and the server swaps to the version without it."""

from __future__ import annotations

import json

import openai
import pytest
from helpers import publish_version
from safetensors.torch import load_file

from herllm.memory.knowledge import Scope
from herllm.memory.knowledge.consolidate_run import consolidate_run
from herllm.serve.versions import LOAD_LOCK

FACT = "The lighthouse keeper of Vell Point is named Orla Finch and she keeps three goats."


def adapter(run, version: str) -> dict:
    return load_file(str(run / "checkpoints" / version / "adapters" / "default" /
                         "adapter_model.safetensors"))  # fmt: skip


def test_admin_forget_rolls_a_consolidated_fact_out_of_the_served_adapter(live, client):
    run = live.run
    start = publish_version(run, 1, seed=0).name
    (run / "checkpoints" / start / "cursor.json").write_text(json.dumps({}))
    live.deps.versions.refresh()
    client.chat.completions.create(model="herllm-tiny", max_tokens=4,
                                   messages=[{"role": "user", "content": FACT}])  # fmt: skip
    assert [it.text for it in live.deps.store.list(Scope("user", "alice"))] == [FACT]
    with LOAD_LOCK:  # the server's version watcher loads models in this process too
        res, path = consolidate_run(run, Scope("user", "alice"), min_retrievals=0, passes=2,
                                    lr=1e-2, tolerance=10.0)  # fmt: skip
    assert res.accepted and path is not None
    assert any(not (adapter(run, path.name)[k] == v).all() for k, v in adapter(run, start).items())
    root = openai.OpenAI(base_url=live.url + "/v1", api_key=live.tokens["root"], max_retries=0)
    out = root.post("/admin/forget", cast_to=object, body={"user": "alice"})
    assert out["facts_forgotten"] == 1
    assert (
        out["weights"]["rolled_back"] == [res.entry] and out["weights"]["consolidated_again"] == []
    )
    new = out["weights"]["version"]
    assert new not in (start, path.name) and live.deps.versions.current()[0] == new
    before, after = adapter(run, start), adapter(run, new)
    assert before.keys() == after.keys() and all((after[k] == v).all() for k, v in before.items())
    # nothing of alice's was consolidated any more: a second forget leaves the weights alone
    assert root.post("/admin/forget", cast_to=object, body={"user": "alice"})["weights"] is None


def test_admin_forget_refuses_with_409_while_another_process_holds_the_run(live, client, hold_run):
    client.chat.completions.create(model="herllm-tiny", max_tokens=4,
                                   messages=[{"role": "user", "content": FACT}])  # fmt: skip
    root = openai.OpenAI(base_url=live.url + "/v1", api_key=live.tokens["root"], max_retries=0)
    with hold_run(live.run):
        with pytest.raises(openai.ConflictError, match="stop the learner first"):
            root.post("/admin/forget", cast_to=object, body={"user": "alice"})
    assert [it.text for it in live.deps.store.list(Scope("user", "alice"))] == [FACT]  # kept
    assert (
        root.post("/admin/forget", cast_to=object, body={"user": "alice"})["facts_forgotten"] == 1
    )
