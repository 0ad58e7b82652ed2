"""Fixtures of the knowledge-store tests: a fast hashing encoder, the 10-document sample."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from knowledge_test_encoder import HashEncoder

DATA = Path(__file__).parent / "data" / "fictional_knowledge_10.json"


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    import torch

    torch.set_num_threads(1)


@pytest.fixture
def hash_encoder() -> HashEncoder:
    return HashEncoder()


@pytest.fixture(scope="session")
def fk10() -> list[dict]:
    return json.loads(DATA.read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def minilm():
    from herllm.memory.knowledge import load_encoder

    return load_encoder("minilm")
