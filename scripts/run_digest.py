"""Digest of a finished run directory: a hash of every adapter tensor, the counters, the step,
the cursor and the replay rows of its newest checkpoint.

Two runs that print the same digest ended with bit-identical adapters and the same learning
history. It reads only the run directory (PEFT folders, trainer.pt, cursor.json, replay.sqlite),
never herllm's modules, so it compares runs made by different versions of the code:

    python scripts/run_digest.py runs/a runs/b     # prints both digests and whether they match
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sqlite3
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file


def newest_checkpoint(run: Path) -> Path:
    ckpts = sorted(p for p in (run / "checkpoints").glob("step-*") if p.is_dir())
    if not ckpts:
        raise SystemExit(f"{run}: no checkpoints; pass a run directory of a finished run")
    return ckpts[-1]


def digest(run: Path) -> dict:
    ckpt = newest_checkpoint(run)
    h = hashlib.sha256()
    tensors = 0
    for f in sorted((ckpt / "adapters").rglob("adapter_model.safetensors")):
        for name, t in sorted(load_file(str(f)).items()):
            h.update(f"{f.parent.name}/{name}".encode())
            h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
            tensors += 1
    trainer = torch.load(ckpt / "trainer.pt", weights_only=False)
    counters = {k: v for k, v in trainer["counters"].items() if k != "train_seconds"}
    rows = []
    if (run / "replay.sqlite").is_file():
        with sqlite3.connect(run / "replay.sqlite") as db:
            rows = sorted(db.execute("SELECT doc_id, offset, times_replayed, last_score FROM rows"))
    rows_hash = hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]
    bank = trainer.get("bank") or {}
    return {
        "checkpoint": ckpt.name,
        "adapters_sha256": h.hexdigest()[:16],
        "adapter_tensors": tensors,
        "adapters": sorted(bank.get("adapters", {})) if isinstance(bank, dict) else [],
        "counters": counters,
        "cursor": json.loads((ckpt / "cursor.json").read_text()),
        "replay_rows": len(rows),
        "replay_rows_sha256": rows_hash,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    args = ap.parse_args()
    digests = [digest(r) for r in args.runs]
    for run, d in zip(args.runs, digests, strict=True):
        print(json.dumps({"run": str(run), **d}, sort_keys=True))
    if len(digests) > 1:
        same = all(d == digests[0] for d in digests[1:])
        print("MATCH" if same else "DIFFER")
        return 0 if same else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
