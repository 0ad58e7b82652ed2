"""Tiny models for tests, built locally (no hub): a Llama + byte-level BPE tokenizer folder, and
an in-memory LoRA Llama. Imported by name (`from tiny_models import ...`), not through conftest:
several conftest.py files share that module name."""

from __future__ import annotations

from pathlib import Path

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
