"""Chat-format training on the real smollm2-135m tokenizer: a packed window built from chat
records trains the assistant turns and nothing else."""

from __future__ import annotations

import json

import pytest
from model_fakes import real_model_marks
from transformers import AutoTokenizer

from herllm.acquire.chunks import Packer
from herllm.acquire.sources import read_documents
from herllm.models import cache, registry

ENTRY = registry.get_model("smollm2-135m")
pytestmark = real_model_marks()
CONVERSATION = [
    {"role": "system", "content": "The keeper writes the day into the ledger."},
    {"role": "user", "content": "What does the river carry?"},
    {"role": "assistant", "content": "What the mountain gives it."},
    {"role": "user", "content": "And the valley?"},
    {"role": "assistant", "content": "The valley listens."},
]


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    return AutoTokenizer.from_pretrained(cache.ensure_converted(ENTRY))


def test_a_packed_window_of_chat_records_trains_only_the_assistant_turns(
    smollm2_tokenizer, tmp_path
):
    tok = smollm2_tokenizer
    src = tmp_path / "chats.jsonl"
    records = [
        {"messages": CONVERSATION},
        {"prompt": "Rain falls.", "response": "The river rises."},
    ]
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    [window] = list(Packer(tok, 256).windows(read_documents([str(src)])))
    ids = window.input_ids[: window.n_tokens].tolist()
    mask = window.loss_mask[: window.n_tokens].tolist()
    trained = tok.decode([i for i, m in zip(ids, mask, strict=True) if m])
    assert trained == (
        "What the mountain gives it.<|im_end|>The valley listens.<|im_end|>"
        "The river rises.<|im_end|>"
    )
    masked = tok.decode([i for i, m in zip(ids, mask, strict=True) if not m])
    for prompt_part in ("<|im_start|>system\nThe keeper", "<|im_start|>user\nWhat does the river",
                        "<|im_start|>assistant\n", "<|im_start|>user\nRain falls."):  # fmt: skip
        assert prompt_part in masked
    rendered = tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert tok.decode(ids).startswith(rendered.rstrip())  # the template's own rendering
    assert not window.loss_mask[window.n_tokens :].any()
