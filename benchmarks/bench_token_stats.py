"""What the per-step scores of `select.scores=step` cost: `token_stats` (each row's loss, and
its entropy for the shift detector) over one step's new rows, with and without the entropy.

    python benchmarks/bench_token_stats.py --rows 6 --seq-len 128 --vocab 8192

Prints milliseconds per call (mean of `--repeat` calls after one warm-up); herllm-tiny's vocabulary
has 8,192 tokens, SmolLM2's 49,152.
"""

from __future__ import annotations

import argparse
import time

import torch

from herllm.refine.scoring import token_stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=6, help="new rows per step (8 minus replay)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--repeat", type=int, default=50)
    args = ap.parse_args()
    torch.manual_seed(0)
    logits = torch.randn(args.rows, args.seq_len, args.vocab)
    labels = torch.randint(0, args.vocab, (args.rows, args.seq_len))
    for entropy in (True, False):
        token_stats(logits, labels, entropy)
        start = time.perf_counter()
        for _ in range(args.repeat):
            token_stats(logits, labels, entropy)
        ms = (time.perf_counter() - start) / args.repeat * 1000
        print(f"{'loss + entropy' if entropy else 'loss only'}: {ms:.2f} ms per call")


if __name__ == "__main__":
    main()
