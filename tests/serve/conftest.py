"""Fixtures of the serve tests: a herllm-tiny run made by `herllm serve`, a live server."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers import LiveServer, make_deps, make_run  # noqa: E402

pytest.importorskip("fastapi")
pytest.importorskip("openai")


@pytest.fixture()
def run_and_tokens(tmp_path):
    return make_run(tmp_path)


@pytest.fixture()
def live(run_and_tokens):
    run, tokens = run_and_tokens
    with LiveServer(make_deps(run)) as server:
        server.run, server.tokens = run, tokens
        yield server


@pytest.fixture()
def client(live):
    import openai

    return openai.OpenAI(base_url=live.url + "/v1", api_key=live.tokens["alice"], max_retries=0)
