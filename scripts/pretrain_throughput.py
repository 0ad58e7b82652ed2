"""Measure pretraining throughput (tokens/s) of the default model at a few seq lens / batch sizes.

MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000 python scripts/pretrain_throughput.py
"""

from __future__ import annotations

import sys
import time

import torch

from herllm.models.pretrain import PretrainConfig, _loss, build_model, make_optimizer


def measure(seq_len: int, batch_size: int, steps: int = 6) -> float:
    """Tokens/s of full training steps (forward, backward, AdamW) after 2 warm-up steps."""
    cfg = PretrainConfig(seq_len=seq_len, batch_size=batch_size)
    model = build_model(cfg)
    opt = make_optimizer(model, cfg)
    x = torch.randint(0, cfg.vocab_size, (batch_size, seq_len + 1))  # (B, T+1)
    for i in range(steps + 2):
        if i == 2:
            t0 = time.perf_counter()
        loss = _loss(model, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return steps * batch_size * seq_len / (time.perf_counter() - t0)


if __name__ == "__main__":
    torch.set_num_threads(2)
    model = build_model(PretrainConfig())
    print(f"params: {sum(p.numel() for p in model.parameters()):,}")
    for seq_len, bs in [(int(a), int(b)) for a, b in (s.split("x") for s in sys.argv[1:])] or [
        (128, 32),
        (256, 16),
    ]:
        print(f"seq_len {seq_len} batch {bs}: {measure(seq_len, bs):.0f} tok/s", flush=True)
