"""Shared fixtures: a tiny Llama and a byte-level BPE tokenizer built locally (no hub)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TEXT = (
    "The river carries what the mountain gives it. Rain falls, the river rises, the valley "
    "listens. A lamp burns in the window; the keeper writes the day into the ledger. "
    "def add(a, b):\n    return a + b\n\nclass Stack:\n    def push(self, x):\n        self.items.append(x)\n"
) * 20


def build_tiny_model(
    path: Path, vocab_size: int = 384, hidden: int = 32, layers: int = 2, seed: int = 0
) -> Path:
    """Save a tiny Llama + tokenizer directory loadable with from_pretrained."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        [TEXT], vocab_size=vocab_size, min_frequency=1, special_tokens=["<s>", "</s>", "<pad>"]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    tok.save_pretrained(path)
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


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


def tiny_lora_llama(seed: int = 0, vocab: int = 64, hidden: int = 32, r: int = 4):
    """An in-memory tiny Llama with one LoRA adapter (`default`) on q/v projections."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
    )  # fmt: skip
    lora = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    return get_peft_model(LlamaForCausalLM(config), lora)


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
