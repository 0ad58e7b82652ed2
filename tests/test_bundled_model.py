"""The bundled base model `herllm-tiny` loads offline and reproduces its recorded loss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

MODEL_DIR = Path(__file__).resolve().parents[1] / "src" / "herllm" / "assets" / "herllm-tiny"
REFERENCE = Path(__file__).with_name("bundled_model_reference.json")

pytestmark = pytest.mark.skipif(
    not (MODEL_DIR / "config.json").exists(), reason="herllm-tiny not bundled"
)


@pytest.fixture(scope="module")
def bundled():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(MODEL_DIR, local_files_only=True)
    return model, tok


def test_files_present():
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json"):  # fmt: skip
        assert (MODEL_DIR / name).exists(), name


def test_loads_as_fp32_llama_with_expected_shape(bundled):
    model, tok = bundled
    assert model.config.model_type == "llama"
    assert model.dtype == torch.float32
    assert model.config.vocab_size == len(tok) == 8192
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    assert tok("hi")["input_ids"][0] == tok.bos_token_id


def test_reproduces_recorded_loss(bundled):
    model, tok = bundled
    ref = json.loads(REFERENCE.read_text(encoding="utf-8"))
    ids = tok(ref["text"], return_tensors="pt")["input_ids"]
    assert ids.shape[1] == ref["tokens"]
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    assert abs(loss - ref["loss"]) < 1e-4, (loss, ref["loss"])


def test_generates_text(bundled):
    model, tok = bundled
    ids = tok("In the beginning", return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 8
    assert isinstance(tok.decode(out[0]), str)
