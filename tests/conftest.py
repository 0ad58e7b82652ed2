"""Shared fixtures: a tiny Llama and a byte-level BPE tokenizer built locally (no hub)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tiny_models import TEXT, build_tiny_model, tiny_lora_llama  # noqa: F401


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture()
def text_corpus(tmp_path) -> Path:
    """A small folder of text documents in the record-separated layout."""
    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(3):
        docs = [f"Document {i}-{j}. " + TEXT[(i * 97 + j * 31) % 400 :][:300] for j in range(4)]
        (root / f"part{i}.txt").write_text("\n\x1e\n".join(docs), encoding="utf-8")
    return root


# -- the knowledge store's tests (tests/memory/knowledge/) ------------------------------------
FK10 = Path(__file__).parent / "memory" / "knowledge" / "data" / "fictional_knowledge_10.json"


@pytest.fixture
def hash_encoder():
    """A fast deterministic encoder for store tests (tests/memory/knowledge)."""
    from knowledge_test_encoder import HashEncoder  # beside the tests that use it

    return HashEncoder()


@pytest.fixture(scope="session")
def fk10() -> list[dict]:
    """The first 10 Fictional Knowledge documents with their probes (Apache-2.0)."""
    import json

    return json.loads(FK10.read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def minilm():
    from herllm.memory.knowledge import load_encoder

    return load_encoder("minilm")


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def chat_tokenizer(model_dir: Path, template: str | None = CHATML):
    """The tiny model's tokenizer with ChatML markers and a simple Jinja chat template."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    tok.chat_template = template
    return tok


@pytest.fixture()
def chatml_tokenizer(tiny_model_dir):
    return chat_tokenizer(tiny_model_dir)


@pytest.fixture()
def hold_run():
    """`with hold_run(path) as pid:` another process holds the run directory's lock (as a
    learner does) until the block ends; it is killed then."""
    import contextlib
    import subprocess
    import sys

    @contextlib.contextmanager
    def holding(path):
        code = ("import sys, time; from herllm.run.lock import RunLock; "
                "lock = RunLock(sys.argv[1], 'x').acquire(); print('held', flush=True); time.sleep(120)")  # fmt: skip
        proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE,
                                text=True)  # fmt: skip
        try:
            assert proc.stdout.readline().strip() == "held"
            yield proc.pid
        finally:
            proc.kill()
            proc.wait()

    return holding
