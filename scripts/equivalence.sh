#!/usr/bin/env bash
# Fixed-seed runs whose digests (scripts/run_digest.py) compare two versions of the code:
# `her` on one process, a second single-process run exercising EWC + SI + KL + Reptile with
# summed adapters, and `her` on 2 DDP processes (torchrun, gloo). The stream is the demo's:
# three bundled HER-Stream domains, 120 kB each, built once with `herllm demo`'s builder.
#
#   PYTHONPATH=/path/to/other/checkout/src bash scripts/equivalence.sh OUT   # the other version
#   bash scripts/equivalence.sh OUT2                                         # this checkout
#   python scripts/run_digest.py OUT/her OUT2/her   (and mix, ddp)
set -euo pipefail
OUT=${1:?usage: equivalence.sh OUT_DIR [DATA_DIR]}
DATA=${2:-$OUT/data}
PY=${PYTHON:-python}
export MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
if [ ! -d "$DATA/stream" ]; then
  "$PY" -c "from pathlib import Path; from herllm.demo import build_demo_stream; build_demo_stream(Path('$DATA'), 120000, 40000)"
fi
COMMON=(--eval "$DATA"/heldout/austen.txt --eval "$DATA"/heldout/pycode.txt --eval "$DATA"/heldout/kjv.txt
        --quiet --set train.seed=0 --set eval.every_steps=100 --set checkpoint.every_steps=100)
rm -rf "$OUT/her" "$OUT/mix" "$OUT/ddp"
"$PY" -m herllm.cli adapt "$DATA/stream" --strategy her --run-dir "$OUT/her" "${COMMON[@]}"
"$PY" -m herllm.cli adapt "$DATA/stream" --strategy her --run-dir "$OUT/mix" "${COMMON[@]}" \
  --max-steps 400 --set 'protect.regularizers=[ewc,si,kl]' --set protect.reptile_every=20 \
  --set expand.compose=sum --set shift.warmup=64 --set shift.cooldown=120
OMP_NUM_THREADS=1 "$PY" -m torch.distributed.run --standalone --nproc_per_node 2 -m herllm.cli adapt \
  "$DATA/stream" --strategy her --run-dir "$OUT/ddp" "${COMMON[@]}" --max-steps 300 \
  --set shift.warmup=64 --set shift.cooldown=120
