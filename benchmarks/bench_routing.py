"""Routing keys on the bundled domains: can the base model's representations tell them apart?

For every bundled domain, fit a routing key (`herllm.update.adapters.RoutingKey`) on `--key-windows`
windows drawn uniformly from the first `--train-windows` windows of its train split (what a unit's
reservoir holds), then route `--test-windows` held-out windows of every domain and report:

- routing accuracy and the confusion matrix (keys only; no adapter is trained here, so this
  isolates the router from the learner; the benchmark's routing figures cover the whole loop);
- the reuse decision at a shift: the median distance ratio of 16 held-out windows to their own
  domain's key, and (leave-one-out) to the nearest other key, against `expand.reuse_radius`;
- how much general text lies beyond `expand.fallback_radius` (routed with `expand.fallback=base`).

    python benchmarks/bench_routing.py --out results/bench_routing.json
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from herllm.acquire.corpus import DOMAINS, load_documents
from herllm.bench.suite import pack_batches
from herllm.config import ExpandConfig, build_config
from herllm.evaluate import metrics as M
from herllm.models.load import attach_lora, load_base
from herllm.update.adapters import BASE, AdapterBank, RoutingKey, base_reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-windows", type=int, default=375)
    ap.add_argument("--key-windows", type=int, default=ExpandConfig.key_windows)
    ap.add_argument("--test-windows", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results/bench_routing.json")
    args = ap.parse_args()

    cfg = build_config(None, [])
    base, tok = load_base(cfg.model)
    model = attach_lora(base, cfg.lora)
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    keys, test = {}, {}
    for d in DOMAINS:
        train = base_reps(
            model, pack_batches(load_documents(d, "train"), tok, 128, args.train_windows)
        )
        pick = rng.choice(len(train), min(args.key_windows, len(train)), replace=False)
        keys[d] = RoutingKey.fit(f"unit-{d}", d, train.numpy()[pick])
        test[d] = base_reps(
            model, pack_batches(load_documents(d, "test"), tok, 128, args.test_windows)
        ).numpy()
    general = base_reps(
        model, pack_batches(load_documents("general", "test"), tok, 128, args.test_windows)
    ).numpy()
    seconds = time.perf_counter() - t0

    ex = ExpandConfig()
    # `base`: what lies beyond the radius is counted (the default `nearest` would route it anyway)
    bank = AdapterBank(DOMAINS[0], reuse_radius=ex.reuse_radius, fallback_radius=ex.fallback_radius,
                       fallback="base")  # fmt: skip
    for d in DOMAINS:
        bank.register(d)
        bank.add_key(keys[d])
    names = list(DOMAINS) + [BASE]
    true, routed = [], []
    for i, d in enumerate(DOMAINS):
        for r in bank.route(test[d]):
            true.append(i)
            routed.append(names.index(r))
    conf = M.routing_confusion(true, routed, len(DOMAINS), len(names))
    reuse = {}
    for d in DOMAINS:
        others = AdapterBank("x")
        for e in DOMAINS:
            if e != d:
                others.register(e)
                others.add_key(keys[e])
        own = bank.decide(test[d][:16])
        new = others.decide(test[d][:16])
        reuse[d] = {"own_ratio": own[1], "own_decision": own[0], "nearest_other_ratio": new[1],
                    "new_decision": new[0] or "grow"}  # fmt: skip
    gen_routes = bank.route(general)
    result = {
        "accuracy": M.routing_accuracy(conf),
        "per_domain": dict(zip(DOMAINS, M.routing_per_domain(conf).tolist(), strict=True)),
        "confusion": conf.tolist(),
        "routes": [*DOMAINS, "base"],
        "reuse": reuse,
        "general_to_base": float(np.mean([r == BASE for r in gen_routes])),
        "general_routes": {n: gen_routes.count(n) for n in set(gen_routes)},
        "reuse_radius": ex.reuse_radius,
        "fallback_radius": ex.fallback_radius,
        "seconds": seconds,
        "args": vars(args),
    }
    from pathlib import Path

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"routing accuracy {result['accuracy']:.4f}")
    for d in DOMAINS:
        r = reuse[d]
        print(f"{d:12s} acc {result['per_domain'][d]:.3f}  own {r['own_ratio']:.2f} ({r['own_decision']})  "
              f"nearest other {r['nearest_other_ratio']:.2f} ({r['new_decision']})")  # fmt: skip
    print(
        f"general text -> base model: {result['general_to_base']:.2%}; routes {result['general_routes']}"
    )


if __name__ == "__main__":
    main()
