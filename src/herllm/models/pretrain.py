"""Pretrain the bundled tiny Llama base model on the HER-Stream general corpus.

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000 \\
        python -m herllm.models.pretrain --out build/pretrain [--resume] [--max-tokens N]

The loop is flat (nanoGPT style): set lr, evaluate and checkpoint on a cadence,
forward/backward, clip, step, log. Checkpoints are atomic (temp dir, fsync,
rename) and carry model, optimizer, scheduler, RNG and data position, so
``--resume`` continues exactly where the last checkpoint left off. The final
model is exported as a Hugging Face directory (``OUT/final``).
"""

from __future__ import annotations

import argparse
import ast
import copy
import dataclasses
import inspect
import json
import math
import random
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from herllm.acquire import corpus as data
from herllm.models.pretrain_ckpt import latest_checkpoint, load_checkpoint, save_checkpoint
from herllm.models.tokenizer import load_tokenizer, train_tokenizer


@dataclass
class PretrainConfig:
    """Settings of one pretraining run (every field is a CLI flag of ``herllm pretrain``)."""

    out: str = "build/pretrain"
    """Run directory: tokenizer/, tokens.npy, checkpoints/, final/ (the exported HF model)."""
    tokenizer_dir: str = ""
    """Existing tokenizer to use; empty trains a byte-level BPE into OUT/tokenizer."""
    vocab_size: int = 8192
    """BPE vocabulary size (also the model's embedding rows)."""
    hidden_size: int = 256
    """Model width."""
    num_layers: int = 4
    """Transformer blocks."""
    num_heads: int = 4
    """Attention heads (head dim = hidden_size / num_heads)."""
    intermediate_size: int = 688
    """SwiGLU MLP width (about 8/3 of hidden_size, rounded to a multiple of 8)."""
    seq_len: int = 256
    """Tokens per training sequence (measured on the 2-core VM: 256x16 ran at 1,200 tok/s
    vs 895 for 128x32 under the same load, so the longer context costs nothing here)."""
    batch_size: int = 16
    """Sequences per optimizer step."""
    max_tokens: int = 16_000_000
    """Training budget in tokens; steps = max_tokens // (batch_size * seq_len). The bundled
    model used 16M (2.65 epochs of the general corpus, ~65 min at ~4,300 tok/s on 2 cores)."""
    lr: float = 2e-3
    """Peak learning rate (AdamW)."""
    min_lr_ratio: float = 0.1
    """Cosine schedule floor, as a fraction of ``lr``."""
    warmup_steps: int = 100
    """Linear warm-up steps before the cosine decay."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay on matrices (not on norms)."""
    beta2: float = 0.95
    """AdamW second-moment decay (0.95 is the usual choice for short LM runs)."""
    grad_clip: float = 1.0
    """Global gradient-norm clip."""
    seed: int = 0
    """Seed for init, data order and dropout-free RNG state."""
    threads: int = 2
    """torch intra-op threads (the VM has 2 cores)."""
    checkpoint_every_s: float = 300.0
    """Seconds between atomic checkpoints."""
    keep_checkpoints: int = 2
    """Checkpoints kept on disk (older ones are deleted after a new one lands)."""
    eval_every_steps: int = 200
    """Steps between held-out evaluations on the general test split."""
    eval_sequences: int = 64
    """Held-out sequences per evaluation (fixed, so evaluations are comparable)."""
    log_every_steps: int = 20
    """Steps between plain log lines (the rich bar only shows on a terminal)."""

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}; "
                "pick num_heads that divides it"
            )
        for name in ("seq_len", "batch_size", "max_tokens", "threads", "vocab_size"):
            if getattr(self, name) <= 0:
                raise ValueError(
                    f"PretrainConfig.{name} must be positive, got {getattr(self, name)}"
                )

    @property
    def total_steps(self) -> int:
        """Optimizer steps in the whole run."""
        return max(1, self.max_tokens // (self.batch_size * self.seq_len))


def build_model(cfg: PretrainConfig) -> LlamaForCausalLM:
    """A freshly initialised Llama of the configured size (tied embeddings, fp32)."""
    config = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=1024,
        tie_word_embeddings=True,  # saves 2M params: a third of this model
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    torch.manual_seed(cfg.seed)
    return LlamaForCausalLM(config)


def tokenize_corpus(cfg: PretrainConfig, tok, split: str) -> np.ndarray:
    """General corpus ``split`` as one uint16 token stream: ``<s> doc </s> <s> doc </s> ...``."""
    cache = Path(cfg.out) / f"tokens-{split}.npy"
    if cache.exists():
        return np.load(cache)
    docs = data.load_documents(data.GENERAL, split)
    ids = tok(docs, add_special_tokens=True, verbose=False)["input_ids"]
    flat = np.fromiter(
        (t for seq in ids for t in [*seq, tok.eos_token_id]), dtype=np.uint16
    )  # (N,)
    np.save(cache, flat)
    return flat


def batch_at(tokens: np.ndarray, order: np.ndarray, idx: int, cfg: PretrainConfig) -> torch.Tensor:
    """Training batch number ``idx``: rows of ``seq_len + 1`` tokens in a seeded order."""
    n = len(order)
    rows = [order[(idx * cfg.batch_size + i) % n] for i in range(cfg.batch_size)]
    span = cfg.seq_len + 1
    x = np.stack([tokens[r * span : (r + 1) * span] for r in rows]).astype(np.int64)
    return torch.from_numpy(x)  # (B, T+1)


def lr_at(step: int, cfg: PretrainConfig) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio * lr``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.total_steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def make_optimizer(model: torch.nn.Module, cfg: PretrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (norm gains and biases are not decayed)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, cfg.beta2), eps=1e-8)


@torch.no_grad()
def evaluate(model: LlamaForCausalLM, tokens: np.ndarray, cfg: PretrainConfig) -> float:
    """Mean next-token loss on the first ``eval_sequences`` held-out sequences."""
    model.eval()
    span = cfg.seq_len + 1
    n = min(cfg.eval_sequences, len(tokens) // span)
    losses = []
    for start in range(0, n, cfg.batch_size):
        rows = range(start, min(n, start + cfg.batch_size))
        x = torch.from_numpy(
            np.stack([tokens[r * span : (r + 1) * span] for r in rows]).astype(np.int64)
        )
        losses.append(_loss(model, x).item())
    model.train()
    return float(np.mean(losses))


def _loss(model: LlamaForCausalLM, x: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of a (B, T+1) batch."""
    logits = model(input_ids=x[:, :-1]).logits  # (B, T, V)
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())


def export(model: LlamaForCausalLM, tok, out_dir: Path, half: bool = False) -> Path:
    """Write an HF model dir: config.json, model.safetensors, tokenizer files, generation_config.

    ``half`` stores the weights as fp16 (half the bytes); they load back as fp32 with
    exactly the stored values; ``model`` itself is not modified.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    # a copy: .half() would also round the caller's rotary buffers
    (copy.deepcopy(model).half() if half else model).save_pretrained(
        out_dir, safe_serialization=True
    )
    # save_pretrained records the storage dtype; declare float32 so that from_pretrained
    # (dtype="auto" in transformers 5) upcasts fp16 storage and training runs in fp32
    cfg_path = out_dir / "config.json"
    config = json.loads(cfg_path.read_text())
    config["dtype"] = "float32"
    cfg_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tok.save_pretrained(out_dir)
    GenerationConfig(bos_token_id=0, eos_token_id=1, pad_token_id=2, do_sample=True, top_k=50,
                     temperature=0.8, max_new_tokens=64).save_pretrained(out_dir)  # fmt: skip
    return out_dir


def run_pretrain(cfg: PretrainConfig, resume: bool = False) -> Path:
    """Train (or resume) the base model; return the exported HF directory ``OUT/final``."""
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    tok = _get_tokenizer(cfg)
    train_tokens, test_tokens = (
        tokenize_corpus(cfg, tok, "train"),
        tokenize_corpus(cfg, tok, "test"),
    )
    order = np.random.default_rng(cfg.seed).permutation(len(train_tokens) // (cfg.seq_len + 1))
    model = build_model(cfg)
    opt = make_optimizer(model, cfg)
    step, history = 0, []
    ckpt = latest_checkpoint(out / "checkpoints") if resume else None
    if ckpt is not None:
        step, history = load_checkpoint(ckpt, model, opt)
        print(f"resumed from {ckpt} at step {step}", flush=True)
    else:
        random.seed(cfg.seed)
    _train_loop(cfg, model, opt, train_tokens, test_tokens, order, step, history)
    return export(model, tok, out / "final")


def _get_tokenizer(cfg: PretrainConfig):
    """Load ``tokenizer_dir``, or train (once) a tokenizer on the general train corpus."""
    if cfg.tokenizer_dir:
        return load_tokenizer(cfg.tokenizer_dir)
    path = Path(cfg.out) / "tokenizer"
    if not (path / "tokenizer.json").exists():
        train_tokenizer(data.load_documents(data.GENERAL, "train"), path, cfg.vocab_size)
    return load_tokenizer(path)


def _train_step(model, opt, x: torch.Tensor, lr: float, cfg: PretrainConfig) -> float:
    """One optimizer step on a (B, T+1) batch; returns the loss."""
    for g in opt.param_groups:
        g["lr"] = lr
    loss = _loss(model, x)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    return loss.item()


def _progress() -> Progress:
    """Rich bar with tokens/s, loss and lr (hidden when stdout is not a terminal: log lines then)."""
    stats = "{task.fields[tps]:.0f} tok/s loss {task.fields[loss]:.3f} lr {task.fields[lr]:.2e}"
    columns = [TextColumn("step {task.completed}/{task.total}"), BarColumn(), TextColumn(stats)]
    return Progress(*columns, TimeRemainingColumn(), disable=not sys.stdout.isatty())


def _train_loop(cfg, model, opt, train_tokens, test_tokens, order, step, history) -> None:
    """The flat loop: set lr, forward/backward/clip/step, log, evaluate, checkpoint."""
    out = Path(cfg.out)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    last_ckpt, t0, tokens_since = time.time(), time.time(), 0
    with _progress() as bar:
        task = bar.add_task("pretrain", total=cfg.total_steps, completed=step, tps=0, loss=0, lr=0)
        model.train()
        while step < cfg.total_steps:
            # set lr, then forward / backward / clip / step on the next batch in the seeded order
            lr = lr_at(step, cfg)
            loss = _train_step(model, opt, batch_at(train_tokens, order, step, cfg), lr, cfg)
            step += 1
            tokens_since += tokens_per_step
            # log
            tps = tokens_since / (time.time() - t0)
            bar.update(task, completed=step, tps=tps, loss=loss, lr=lr)
            if step % cfg.log_every_steps == 0:
                print(f"step {step}/{cfg.total_steps} loss {loss:.4f} lr {lr:.2e} "
                      f"tok/s {tps:.0f} tokens {step * tokens_per_step}", flush=True)  # fmt: skip
            # evaluate on the held-out general test split
            if step % cfg.eval_every_steps == 0 or step == cfg.total_steps:
                val = evaluate(model, test_tokens, cfg)
                history.append({"step": step, "tokens": step * tokens_per_step, "val_loss": val,
                                "train_loss": loss, "time": time.time()})  # fmt: skip
                print(f"eval step {step} val_loss {val:.4f} ppl {math.exp(val):.2f}", flush=True)
            # checkpoint on a wall-clock cadence, and at the end
            if time.time() - last_ckpt > cfg.checkpoint_every_s or step == cfg.total_steps:
                save_checkpoint(
                    out / "checkpoints", step, model, opt, history, cfg.keep_checkpoints
                )
                last_ckpt = time.time()
                print(f"checkpoint step {step}", flush=True)


def field_docs(cls: type) -> dict[str, str]:
    """``{field: docstring}`` of a dataclass whose fields carry attribute docstrings (CLI help)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:], strict=False):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr):
            if isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def main(argv: list[str] | None = None) -> None:
    """``python -m herllm.models.pretrain``: flags generated from :class:`PretrainConfig` fields."""
    ap = argparse.ArgumentParser(description="Pretrain the bundled tiny base model.")
    docs = field_docs(PretrainConfig)
    for f in dataclasses.fields(PretrainConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{docs.get(f.name, '')} (default: {f.default})"
        ap.add_argument(flag, type=type(f.default), default=f.default, dest=f.name, help=help_text)
    ap.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    args = vars(ap.parse_args(argv))
    resume = args.pop("resume")
    final = run_pretrain(PretrainConfig(**args), resume=resume)
    print(f"exported {final}", flush=True)


if __name__ == "__main__":
    main()
