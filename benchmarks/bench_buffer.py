"""Replay buffer benchmark: per-operation insert / sample / score-update time vs. size.

For each size N and policy, builds a full buffer of capacity N (128 tokens per row) by
bulk ``add`` and ``commit``, reopens it (timing the open, which rebuilds the priority
sum-tree), then times steady-state operations one by one and reports medians:

* insert: ``add`` of a batch of 8 rows into the full buffer. Algorithm R's admission
  probability is capacity / offered, which is ~1 right after the fill, so this is the
  worst case (nearly every row replaces one); later in a stream most offers are dropped.
* sample: ``sample(8)`` (includes the ``times_replayed`` update).
* update: ``update_scores`` of the 8 rows just sampled.

Usage:
    python benchmarks/bench_buffer.py --out /tmp/bench_buffer.json [--sizes 10000 100000 1000000]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

from herllm.memory.replay import POLICIES, BufferItem, ReplayBuffer

TOKENS = 128
BATCH = 8


def _items(rng: np.random.Generator, start: int, n: int) -> list[BufferItem]:
    ids = rng.integers(0, 32000, size=(n, TOKENS), dtype=np.int32)  # (n, T)
    return [
        BufferItem(f"doc{(start + i) // 16}", (start + i) % 16 * TOKENS, ids[i]) for i in range(n)
    ]


def _remove(path: Path) -> None:
    for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        p.unlink(missing_ok=True)


def _median_us(samples: list[int]) -> float:
    return float(np.median(samples)) / 1e3


def bench_one(path: Path, size: int, policy: str, n_ops: int) -> dict:
    """Fill, reopen and time steady-state ops for one (size, policy)."""
    _remove(path)
    rng = np.random.default_rng(0)
    buf = ReplayBuffer(path, size, policy, seed=0)
    t0 = time.perf_counter()
    chunk = 10_000
    for start in range(0, size, chunk):
        n = min(chunk, size - start)
        buf.add(_items(rng, start, n), rng.exponential(2.0, n).tolist(), step=0)
    buf.commit(0)
    fill_s = time.perf_counter() - t0
    buf.close()
    t0 = time.perf_counter()
    buf = ReplayBuffer.open(path)
    open_s = time.perf_counter() - t0

    insert_ns, sample_ns, update_ns = [], [], []
    offered = size
    for op in range(n_ops):
        items = _items(rng, offered, BATCH)
        scores = rng.exponential(2.0, BATCH).tolist()
        offered += BATCH
        t = time.perf_counter_ns()
        buf.add(items, scores, step=op + 1)
        insert_ns.append(time.perf_counter_ns() - t)
        t = time.perf_counter_ns()
        rows = buf.sample(BATCH)
        sample_ns.append(time.perf_counter_ns() - t)
        ids, new_scores = [r.row_id for r in rows], rng.exponential(2.0, BATCH).tolist()
        t = time.perf_counter_ns()
        buf.update_scores(ids, new_scores)
        update_ns.append(time.perf_counter_ns() - t)
    t0 = time.perf_counter()
    buf.commit(n_ops)
    commit_s = time.perf_counter() - t0
    assert len(buf) == size
    result = {
        "rows": size,
        "policy": policy,
        "insert8_us": _median_us(insert_ns),
        "insert8_p90_us": float(np.percentile(insert_ns, 90)) / 1e3,
        "sample8_us": _median_us(sample_ns),
        "sample8_p90_us": float(np.percentile(sample_ns, 90)) / 1e3,
        "update8_us": _median_us(update_ns),
        "commit_s": commit_s,
        "fill_s": fill_s,
        "open_s": open_s,
        "size_mb": buf.size_bytes / 2**20,
        "ops": n_ops,
        "stored_in_ops": buf.counters()["added"] - size,
    }
    buf.close()
    _remove(path)
    return result


def markdown(results: list[dict]) -> str:
    head = (
        "| rows | policy | insert 8 (µs, median / p90) | sample 8 (µs, median / p90) "
        "| update_scores 8 (µs) | commit (ms) | open (s) | bulk fill (s) | file (MB) |\n"
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = [
        f"| {r['rows']:,} | {r['policy']} | {r['insert8_us']:.0f} / {r['insert8_p90_us']:.0f} "
        f"| {r['sample8_us']:.0f} / {r['sample8_p90_us']:.0f} | {r['update8_us']:.0f} "
        f"| {r['commit_s'] * 1e3:.0f} | {r['open_s']:.2f} | {r['fill_s']:.1f} | {r['size_mb']:.0f} |"
        for r in results
    ]
    return head + "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON results file")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    parser.add_argument("--ops", type=int, default=500, help="timed ops per size and policy")
    parser.add_argument("--dir", type=Path, default=Path("/tmp"), help="where buffer files go")
    args = parser.parse_args()

    results = []
    for size in args.sizes:
        for policy in args.policies:
            r = bench_one(args.dir / f"bench_buffer_{size}_{policy}.sqlite", size, policy, args.ops)
            print(json.dumps(r), flush=True)
            results.append(r)
    table = markdown(results)
    print(table)
    meta = {"python": platform.python_version(), "numpy": np.__version__, "tokens_per_row": TOKENS}
    args.out.write_text(json.dumps({"meta": meta, "results": results, "markdown": table}, indent=2))


if __name__ == "__main__":
    main()
