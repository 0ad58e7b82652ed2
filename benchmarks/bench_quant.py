"""What the Q4_1 quantization of the shipped SmolLM2 costs, estimated without the original weights.

    python benchmarks/bench_quant.py --out benchmarks/results/quant_smollm2.json

`smollm2-135m` comes from a Q4_1 GGUF file (every decoder Linear in 4-bit blocks of 32 with a
per-block fp16 scale and minimum; the tied embedding in Q8_0); herllm dequantizes it to fp32.
The unquantized weights are not available offline, so the cost of that rounding is estimated by
doing it once more: every decoder Linear weight is re-quantized to Q4_1 with its blocks shifted
by half a block (16 columns), so the new grid does not line up with the old one and adds a
rounding error of the same kind and size. The NLL rise of that second rounding, on the general
held-out split, estimates the first one's. As a check, the same re-quantization on the original
block boundaries must change (almost) nothing: the weights already lie on that grid.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from herllm.acquire.corpus import load_documents
from herllm.bench.suite import pack_batches
from herllm.config import ModelConfig
from herllm.models.load import load_base
from herllm.refine.scoring import mean_nll

BLOCK = 32
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def q4_1_round_trip(w: torch.Tensor, offset: int) -> torch.Tensor:
    """Quantize rows of `w` to Q4_1 (blocks of 32 along the input dimension, starting `offset`
    columns in; the cut-off ends form their own blocks) and dequantize."""
    out = w.clone()
    cols = w.shape[1]
    starts = [0, *range(offset, cols, BLOCK)] if offset else list(range(0, cols, BLOCK))
    for a, b in zip(starts, [*starts[1:], cols], strict=True):
        if b <= a:
            continue
        x = w[:, a:b].double()
        lo = x.min(1, keepdim=True).values.half().double()
        scale = ((x.max(1, keepdim=True).values - lo) / 15).half().double()
        q = torch.where(scale > 0, ((x - lo) / scale.clamp_min(1e-30)).round().clamp(0, 15), 0)
        out[:, a:b] = (q * scale + lo).to(w.dtype)
    return out


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--windows", type=int, default=32, help="general held-out windows of 128")
    ap.add_argument("--out", default="benchmarks/results/quant_smollm2.json")
    args = ap.parse_args()
    model, tok = load_base(ModelConfig(name_or_path=args.model))
    model.eval()
    batches = pack_batches(load_documents("general", "test"), tok, 128, args.windows)
    original = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(".weight")
                and any(k in n for k in LINEARS)}  # fmt: skip
    result = {"model": args.model, "windows": args.windows, "linear_weights": len(original),
              "date": time.strftime("%Y-%m-%d")}  # fmt: skip
    result["nll_dequantized"] = mean_nll(model, batches)[0]
    params = dict(model.named_parameters())
    for label, offset in (("aligned", 0), ("shifted", BLOCK // 2)):
        changed = 0.0
        for n, w in original.items():
            new = q4_1_round_trip(w, offset)
            changed = max(changed, float((new - w).abs().max()))
            params[n].copy_(new)
        result[f"nll_requantized_{label}"] = mean_nll(model, batches)[0]
        result[f"max_weight_change_{label}"] = changed
        for n, w in original.items():
            params[n].copy_(w)
    result["estimated_q4_1_cost_nats"] = (
        result["nll_requantized_shifted"] - result["nll_dequantized"]
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
