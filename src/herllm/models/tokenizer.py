"""Byte-level BPE tokenizer for the bundled base model, trained with ``tokenizers``.

The tokenizer is saved in Hugging Face format (``tokenizer.json``,
``tokenizer_config.json``, ``special_tokens_map.json``) so that
``AutoTokenizer.from_pretrained(dir)`` loads it as a ``PreTrainedTokenizerFast``.
Encoding prepends ``<s>`` (like Llama tokenizers), which gives the first real
token a context to be predicted from; ``</s>`` ends documents in pretraining.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = [BOS, EOS, PAD]  # ids 0, 1, 2


def train_tokenizer(
    texts: Iterable[str], out_dir: str | Path, vocab_size: int = 8192, min_frequency: int = 2
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE of ``vocab_size`` tokens on ``texts``; save it to ``out_dir``."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size={vocab_size} is too small; byte-level BPE needs at least 259")
    tok = Tokenizer(models.BPE())
    # add_prefix_space=False keeps "prompt" + " choice" a token-level prefix extension
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=1024,
        clean_up_tokenization_spaces=False,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    return fast


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Load a tokenizer saved by :func:`train_tokenizer` (or any HF fast tokenizer dir)."""
    path = Path(path)
    if not (path / "tokenizer.json").exists():
        raise ValueError(
            f"no tokenizer.json in {path}; train one with herllm.models.tokenizer.train_tokenizer"
        )
    return PreTrainedTokenizerFast.from_pretrained(path)
