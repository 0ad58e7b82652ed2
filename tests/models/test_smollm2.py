"""The real smollm2-135m: converted from its package's GGUF into the cache (about 20 s)."""

from __future__ import annotations

import time

import pytest
import torch
from model_fakes import real_model_marks

from herllm.config import ModelConfig
from herllm.models import cache, registry
from herllm.models.chat import chat_training_example
from herllm.models.load import load_base, resolve_model_path

ENTRY = registry.get_model("smollm2-135m")
pytestmark = real_model_marks()
TEXT = "The river carries what the mountain gives it. Rain falls, the river rises."


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The model converted into a fresh HERLLM_HOME; (folder, seconds it took)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("HERLLM_HOME", str(tmp_path_factory.mktemp("herllm-home")))
    start = time.perf_counter()
    folder = cache.ensure_converted(ENTRY)
    yield folder, time.perf_counter() - start
    mp.undo()


def test_the_converted_folder_is_a_plain_fp32_hf_model(converted):
    folder, _ = converted
    config = (folder / "config.json").read_text()
    assert "quantization_config" not in config and '"dtype": "float32"' in config
    assert (folder / "chat_template.jinja").is_file()
    assert cache.read_meta(folder)["sha256"] == cache.sha256_of(
        cache.find_package_file(ENTRY.package, ENTRY.gguf_file)
    )


def test_cached_reload_is_fast_and_gives_the_dequantized_logits(converted, monkeypatch):
    from transformers import AutoModelForCausalLM

    folder, conversion_s = converted
    monkeypatch.setenv("HERLLM_HOME", str(folder.parents[1]))
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    start = time.perf_counter()
    model, tok = load_base(ModelConfig(name_or_path="smollm2-135m", dtype="float32"))
    reload_s = time.perf_counter() - start
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp  # not converted again
    assert reload_s < conversion_s / 3, (reload_s, conversion_s)
    assert sum(p.numel() for p in model.parameters()) == ENTRY.parameters
    gguf = cache.find_package_file(ENTRY.package, ENTRY.gguf_file)
    direct = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    ids = tok(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, direct(ids).logits)


def test_smollm2_chat_mask_covers_the_assistant_replies_only(converted, monkeypatch):
    from transformers import AutoTokenizer

    folder, _ = converted
    monkeypatch.setenv("HERLLM_HOME", str(folder.parents[1]))
    tok = AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m"))
    messages = [
        {"role": "user", "content": "What does the river carry?"},
        {"role": "assistant", "content": "What the mountain gives it."},
        {"role": "user", "content": "And then?"},
        {"role": "assistant", "content": "The valley listens."},
    ]
    ids, mask = chat_training_example(tok, {"messages": messages})
    assert ids == tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    trained = tok.decode([i for i, m in zip(ids, mask, strict=True) if m])
    assert trained == "What the mountain gives it.<|im_end|>The valley listens.<|im_end|>"
    assert tok.decode(ids).startswith("<|im_start|>system\nYou are a helpful AI assistant")
