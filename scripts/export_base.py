"""Ship a pretraining checkpoint as the bundled model src/herllm/assets/herllm-tiny.

    python scripts/export_base.py [--run build/pretrain] [--checkpoint DIR]

Takes the latest complete checkpoint of the run (or ``--checkpoint``), stores
the weights as fp16 safetensors (they load back as fp32, exactly these values),
copies the tokenizer, writes ``training_summary.json`` (how far training got)
and records the loss on a fixed text in tests/bundled_model_reference.json.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from herllm.models.pretrain import PretrainConfig, build_model, export
from herllm.models.pretrain_ckpt import latest_checkpoint
from herllm.models.tokenizer import load_tokenizer

ASSET = Path("src/herllm/assets/herllm-tiny")
REFERENCE = Path("tests/bundled_model_reference.json")
TEXT = (
    "In the beginning God created the heaven and the earth. SQLite is a C library that "
    "provides a lightweight disk-based database. def add(a, b):\n    return a + b\n"
)


def summary(cfg: PretrainConfig, ckpt: Path) -> dict:
    """How far the run got: steps, tokens, last held-out loss."""
    trainer = torch.load(ckpt / "trainer.pt", weights_only=False)
    step, history = trainer["step"], trainer["history"]
    tokens = step * cfg.batch_size * cfg.seq_len
    out = {
        "checkpoint": ckpt.name,
        "steps": f"{step}/{cfg.total_steps}",
        "tokens": tokens,
        "planned_tokens": cfg.total_steps * cfg.batch_size * cfg.seq_len,
        "seq_len": cfg.seq_len,
        "batch_size": cfg.batch_size,
        "peak_lr": cfg.lr,
    }
    if history:
        out["val_loss"] = round(history[-1]["val_loss"], 4)
        out["val_ppl"] = round(math.exp(history[-1]["val_loss"]), 2)
        out["val_history"] = [[h["step"], round(h["val_loss"], 4)] for h in history]
    return out


def main() -> None:
    """Export, reload, record the reference loss."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, default=Path("build/pretrain"))
    ap.add_argument("--checkpoint", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=ASSET)
    ap.add_argument("--reference", type=Path, default=REFERENCE)
    args = ap.parse_args()
    torch.set_num_threads(2)
    fields = {f for f in PretrainConfig.__dataclass_fields__}
    saved = json.loads((args.run / "config.json").read_text())
    cfg = PretrainConfig(**{k: v for k, v in saved.items() if k in fields})
    ckpt = args.checkpoint or latest_checkpoint(args.run / "checkpoints")
    if ckpt is None:
        raise SystemExit(f"no checkpoint under {args.run / 'checkpoints'}")
    model = build_model(cfg)
    model.load_state_dict(load_file(ckpt / "model.safetensors"), strict=False)
    model.tie_weights()
    tok = load_tokenizer(args.run / "tokenizer")
    if args.out.exists():
        shutil.rmtree(args.out)
    export(model, tok, args.out, half=True)
    info = summary(cfg, ckpt)
    info["train_tokens_in_corpus"] = int(len(np.load(args.run / "tokens-train.npy")))
    info["epochs"] = round(info["tokens"] / info["train_tokens_in_corpus"], 2)
    (args.out / "training_summary.json").write_text(json.dumps(info, indent=1) + "\n")
    reloaded = AutoModelForCausalLM.from_pretrained(args.out, local_files_only=True).eval()
    assert reloaded.dtype == torch.float32
    ids = tok(TEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = reloaded(input_ids=ids, labels=ids).loss.item()
        loss_mem = model.eval()(input_ids=ids, labels=ids).loss.item()
    ref = {"text": TEXT, "tokens": int(ids.shape[1]), "loss": loss, "loss_in_memory": loss_mem}
    args.reference.write_text(json.dumps(ref, indent=1) + "\n")
    print(json.dumps(info), f"reference loss {loss:.6f} (in-memory {loss_mem:.6f})")


if __name__ == "__main__":
    main()
