"""`herllm bench`: a domain stream x strategies x domain orders -> results.json and a report.

The learner sees one unlabeled stream: the domains' training text back to back (each cut to the
same token budget). Only the evaluator knows where a domain ends: it pauses the learner at
several points inside every domain (`Learner.run(until_tokens=...)`) and measures held-out loss
on every domain and on general text, probe accuracy at domain ends, and the cost of the run.
Reference rows: `base` (no training), `joint` (all domains shuffled together, same budget) and
`hf-peft` (a plain transformers Trainer + PEFT script over the same stream, `hf_reference`).
"""

from __future__ import annotations

import gc
import json
import math
import platform
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from herllm import __version__
from herllm.bench.data import BenchData, load_bench_data
from herllm.bench.suite import intrinsic_signals, run_metrics, switch_indices
from herllm.config import build_config
from herllm.config.sections import LoraConfig, StreamConfig, TrainConfig
from herllm.errors import UserError
from herllm.evaluate.cost import Meter, measure_matmul_peak, peak_rss_mb, train_flops_per_token
from herllm.evaluate.routing import routing_figures
from herllm.strategies import REFERENCE, STRATEGIES, split_spec, strategy_overrides


@dataclass
class BenchConfig:
    domains: list[str] = field(default_factory=list)
    """Domains in stream order (default: the 8 bundled HER-Stream domains, or every folder of --stream-dir)."""
    stream_dir: str = ""
    """A folder laid out as DIR/<domain>/{train,test}.txt (optional probes.jsonl); empty = bundled corpus."""
    strategies: list[str] = field(default_factory=lambda: [*REFERENCE, *STRATEGIES])
    """Strategies to run; `base`, `joint` and `hf-peft` are the reference rows."""
    orders: int = 3
    """Domain orders (order 0 as given, the others seeded permutations); each is one run per strategy."""
    tokens_per_domain: int = 48_000
    """Training tokens streamed from each domain."""
    evals_per_domain: int = 3
    """Evaluations inside each domain (the last one at its end): stability gap and adaptation speed."""
    eval_windows: int = 16
    """Held-out windows per domain test split (and for general text)."""
    probe_items: int = 32
    """Probe items per domain scored at each domain end (0 disables probes)."""
    instructions: int = 32
    """Fixed instructions whose base-model answers score general ability (0 disables)."""
    instruct_tokens: int = 48
    """Greedy tokens of each base-model answer."""
    intrinsic: bool = True
    """Label-free signals at the end of each run (entropy, CKA to the base, generation quality)."""
    model: str = "herllm-tiny"
    """Base model (bundled name, local directory or hub id)."""
    seq_len: int = StreamConfig.seq_len
    """Tokens per window (`herllm adapt`'s default)."""
    batch_size: int = TrainConfig.batch_size
    """Windows per optimizer step (`herllm adapt`'s default)."""
    lr: float = TrainConfig.lr
    """Learning rate of every strategy (`herllm adapt`'s default)."""
    lora_r: int = LoraConfig.r
    """LoRA rank of every strategy (`herllm adapt`'s default; alpha is twice the rank, as there)."""
    seed: int = 0
    """Base seed: order k uses seed + k."""
    tune_domains: list[str] = field(default_factory=list)
    """Tuning domains: each swept strategy's setting (bench/sweep.py) is chosen on these alone,
    then every row is reported on `domains`, which must not share any (empty = no sweep; with
    `domains` empty the test domains are all the others)."""
    tune_orders: int = 1
    """Domain orders of each sweep point on the tuning domains."""
    overrides: list[str] = field(default_factory=list)
    """Config overrides (`section.key=value`) for every learner, after the strategy's own (none by
    default: the benchmark measures what `herllm adapt` does)."""
    out: str = "results/bench"
    """Results directory (results.json, report.md, report.html, plots/)."""
    resume: bool = False
    """Keep the finished runs of `out`/results.json (same settings, else one line says which
    differ) and run only the missing (row, order) pairs: a stopped multi-hour run goes on."""


def domain_orders(domains: list[str], n: int, seed: int) -> list[list[str]]:
    """Order 0 as given, then distinct seeded permutations."""
    if n > math.factorial(len(domains)):
        raise UserError(
            f"--orders {n} is more than the {math.factorial(len(domains))} orders of {len(domains)} domains"
        )
    orders = [list(domains)]
    rng = random.Random(seed)
    while len(orders) < n:
        perm = list(domains)
        rng.shuffle(perm)
        if perm not in orders:
            orders.append(perm)
    return orders


def run_bench(bc: BenchConfig, progress=print, command: str | None = None) -> dict:
    """Run every (strategy, order), write results.json and the report; return the results.
    `command` (the command line that started it) is recorded for the report."""
    unknown = [s for s in bc.strategies if split_spec(s)[0] not in [*STRATEGIES, *REFERENCE]]
    if unknown:
        raise UserError(
            f"unknown strategies {unknown}; choose from {', '.join([*REFERENCE, *STRATEGIES])}"
        )
    out = Path(bc.out)
    out.mkdir(parents=True, exist_ok=True)
    specs = {s: s for s in bc.strategies}  # row label -> what runs (a swept setting, once tuned)
    done, sweep = previous_runs(bc, out / "results.json") if bc.resume else ({}, None)
    if bc.tune_domains and sweep is not None:  # the resumed run's sweep chose the settings
        from herllm.bench.sweep import test_domains

        bc = replace(bc, domains=test_domains(bc))
        for label in specs:
            name, extra = split_spec(label)
            if name in sweep:
                specs[label] = ":".join([sweep[name]["spec"], *extra])
    elif bc.tune_domains:
        from herllm.bench.sweep import test_domains, tune

        bc = replace(bc, domains=test_domains(bc))
        sweep = tune(bc, run_one, domain_orders, progress)
        for label in specs:  # a swept strategy's rows (variants too) use its chosen setting
            name, extra = split_spec(label)
            if name in sweep:
                specs[label] = ":".join([sweep[name]["spec"], *extra])
    data = load_bench_data(bc, out / "data")
    peak = measure_matmul_peak()
    results = {"herllm_version": __version__, "date": time.strftime("%Y-%m-%d"), "config": asdict(bc), "command": command,
               "machine": machine_info(peak), "domains": data.domains, "runs": []}  # fmt: skip
    if sweep is not None:
        results["sweep"] = sweep
    for k, order in enumerate(domain_orders(data.domains, bc.orders, bc.seed)):
        for label, spec in specs.items():
            if (label, bc.seed + k) in done:
                progress(f"[bench] order {k} ({', '.join(order)}): {spec} kept from results.json")
                results["runs"].append(done[label, bc.seed + k])
                continue
            progress(f"[bench] order {k} ({', '.join(order)}): {spec}")
            results["runs"].append(run_one(bc, data, spec, order, k, peak, label))
            gc.collect()
            (out / "results.json").write_text(json.dumps(results, indent=1))
    results["summary"] = summarize(results["runs"])
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return results


def previous_runs(bc: BenchConfig, path: Path) -> tuple[dict, dict | None]:
    """`--resume`: the ok runs of an earlier results.json, keyed by (row, seed), and its sweep.
    Refuses in one line when the earlier run had other settings (its rows would not compare)."""
    if not path.exists():
        return {}, None
    try:
        prev = json.loads(path.read_text())
        old = prev["config"]
    except (ValueError, KeyError) as exc:
        raise UserError(f"--resume: {path} is not a herllm bench results file ({exc}); "
                        "move it away or drop --resume") from None  # fmt: skip
    new = asdict(bc)
    differ = [k for k in new if k not in ("out", "resume", "orders", "strategies")
              and old.get(k) != new[k]]  # fmt: skip
    if differ:
        shown = ", ".join(f"{k} {old.get(k)!r} -> {new[k]!r}" for k in differ)
        raise UserError(f"--resume: {path} was run with other settings ({shown}); "
                        "use another --out or the same settings")  # fmt: skip
    runs = {(r["strategy"], r["seed"]): r | {"kept_from": prev.get("date")}
            for r in prev.get("runs", []) if r.get("status") == "ok"}  # fmt: skip
    return runs, prev.get("sweep")


def machine_info(peak: float) -> dict:
    import os

    return {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "device": "cuda" if torch.cuda.is_available() else "cpu",
            "matmul_peak_gflops": peak}  # fmt: skip


def run_one(
    bc: BenchConfig,
    data: BenchData,
    spec: str,
    order: list[str],
    k: int,
    peak: float,
    label: str | None = None,
) -> dict:
    """One row's run over one order. `spec` is `NAME` or `NAME:key=value...`; `label` is the
    row it is reported as (default: the spec itself)."""
    name, extra = split_spec(spec)
    record = {
        "strategy": label or spec,
        "setting": extra,
        "seed": bc.seed + k,
        "order": order,
        "status": "ok",
        "reason": None,
    }
    if name in STRATEGIES and STRATEGIES[name].missing:
        return record | {"status": "not_implemented", "reason": STRATEGIES[name].missing}
    try:
        if name == "hf-peft":  # a plain Trainer + PEFT script, not the herllm loop
            from herllm.bench.hf_reference import run_hf_reference

            return record | run_hf_reference(
                replace(bc, overrides=[*bc.overrides, *extra]), data, order, k, peak
            )
        return record | Sequence(bc, data, spec, order, k, peak).run()
    except UserError:
        raise
    except Exception as exc:  # a failed run is reported as failed, never as a made-up row
        return record | {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"}


class Sequence:
    """One learner over one domain order, paused by the evaluator inside every domain."""

    def __init__(self, bc, data, spec, order, k, peak):
        strategy, extra = split_spec(spec)
        self.bc, self.data, self.strategy, self.order, self.peak = bc, data, strategy, order, peak
        folder = "-".join([strategy, *(e.replace("=", "_") for e in extra)]).replace("/", "_")
        self.run_dir = Path(bc.out) / "runs" / f"{folder}-order{k}"
        if strategy == "joint":
            self.files = [data.joint_file(bc.seed + k)]
        else:
            self.files = [data.train_files[d] for d in order]
        self.overrides = [] if strategy in REFERENCE else strategy_overrides(strategy)
        self.extra = extra  # a row's own setting: after the bench's overrides, so it wins
        general = Path(bc.stream_dir) / "general" / "train.txt" if bc.stream_dir else None
        if general is not None and general.is_file():  # a user stream brings its own general text
            self.overrides.append(f"replay.general_sources=[{general}]")
        self.seed = bc.seed + k

    def make_learner(self):
        import shutil

        from herllm.run.learner import Learner

        shutil.rmtree(self.run_dir, ignore_errors=True)
        cfg = build_config(None, [
            f"model.name_or_path={self.bc.model}", f"run_dir={self.run_dir}",
            "stream.sources=[" + ",".join(str(f) for f in self.files) + "]",
            f"stream.seq_len={self.bc.seq_len}", f"train.batch_size={self.bc.batch_size}",
            f"train.lr={self.bc.lr}", f"lora.r={self.bc.lora_r}", f"lora.alpha={2 * self.bc.lora_r}",
            f"train.seed={self.seed}", "checkpoint.every_steps=1000000", "eval.every_steps=1000000",
            "replay.capacity=20000", *self.overrides, *self.bc.overrides, *self.extra,
        ])  # fmt: skip
        return Learner(cfg, show_progress=False)

    def run(self) -> dict:
        learner = self.make_learner()
        tok = learner.s.tokenizer
        self.oracle: dict[str, str] = {}  # domain -> the adapter training when it ended
        meter = Meter().start()
        trace: list[dict] = []
        rows, general, instruct, probe_rows = [], [], [], []

        def evaluate(segment: int, at_end: bool) -> None:
            model = learner.s.inference_model()  # routed across adapters when the run grows them
            losses, gen = self.data.suite.losses(model, self.order)
            ins = self.data.suite.instruct_loss(model)
            c = learner.s.counters
            trace.append({"step": learner.s.step, "tokens": c["tokens_trained"], "seconds": meter.seconds,
                          "segment": segment, "losses": losses, "general": gen, "instruct": ins})  # fmt: skip
            if at_end:
                rows.append(losses)
                general.append(gen)
                instruct.append(ins)
                probe_rows.append(self.data.suite.probe_accuracy(model, tok, self.order))
                if learner.s.bank is not None and 0 <= segment < len(self.order):
                    self.oracle[self.order[segment]] = learner.s.bank.current

        evaluate(0 if self.strategy != "joint" else -1, at_end=True)
        if self.strategy != "base":
            self.train(learner, meter, evaluate)
        T = len(self.order)
        while (
            len(rows) < T + 1
        ):  # base: every row is the untrained model; joint: all rows are its end
            rows.append(rows[-1])
            general.append(general[-1])
            instruct.append(instruct[-1])
            probe_rows.append(probe_rows[-1])
        self.instruct = instruct
        return self.finish(learner, meter, trace, rows, general, probe_rows)

    def train(self, learner, meter, evaluate) -> None:
        budgets = [self.data.tokens[f] for f in self.files]
        ends = np.cumsum(budgets)
        e = self.bc.evals_per_domain * (len(self.order) if self.strategy == "joint" else 1)
        for i, end in enumerate(ends):
            start = ends[i - 1] if i else 0
            for j in range(1, e + 1):
                last = i == len(ends) - 1 and j == e
                with meter:  # the very last pause drains the stream: nothing read is left untrained
                    learner.run(until_tokens=None if last else int(start + (end - start) * j / e))
                evaluate(-1 if self.strategy == "joint" else i, at_end=(j == e))

    def finish(self, learner, meter, trace, rows, general, probe_rows) -> dict:
        L = np.array(rows)
        P = np.array(probe_rows, dtype=float) if probe_rows[0] is not None else None
        s = learner.s
        intrinsic = None
        if self.bc.intrinsic:
            intrinsic = intrinsic_signals(
                s.inference_model(), s.tokenizer, self.data.suite.general_batches, seed=self.seed
            )
        c = s.counters
        wall = meter.seconds
        fpt = train_flops_per_token(s.model, self.bc.seq_len)
        flops = c["tokens_trained"] * fpt + c["tokens_scored"] * fpt / 2
        n_params = sum(p.numel() for p in s.model.parameters())
        trainable = sum(p.numel() for p in s.trainable)
        added = sum(p.numel() for n, p in s.model.named_parameters() if "lora_" in n)
        routing = None
        if s.bank is not None and s.bank.compose == "route" and self.oracle:
            routing = routing_figures(
                s.inference_model(), self.data.suite.domain_batches, self.oracle
            )
        switch = self.switch_indices(trace)
        result = {
            "loss_matrix": L.tolist(),
            "probe_matrix": P.tolist() if P is not None else None,
            "general_loss": general,
            "instruct_loss": self.instruct if self.instruct[0] is not None else None,
            "trace": trace,
            "switch_steps": [trace[i]["step"] for i in switch],
            "metrics": self.metrics(L, P, general, trace),
            "cost": {
                "wall_seconds": wall,
                "tokens_trained": c["tokens_trained"],
                "tokens_streamed": c["tokens_streamed"],
                "replaced_by_replay": c["replaced_by_replay"],
                "tokens_scored": c["tokens_scored"],
                "train_tokens_per_s": c["tokens_trained"] / wall if wall else None,
                "peak_rss_mb": peak_rss_mb(),
                "trainable_params": trainable,
                "added_params": added if self.strategy != "base" else 0,
                "adapters": len(s.bank.adapters) if s.bank is not None else 1,
                "adapters_grown": s.bank.grown if s.bank is not None else 0,
                "total_params": n_params,
                "buffer_rows": len(s.buffer) if s.buffer else 0,
                "buffer_bytes": s.buffer.size_bytes if s.buffer else 0,
                "flops_per_token": fpt,
                "mfu": (flops / wall / (self.peak * 1e9)) if wall else None,
                "contention_cpu_seconds": meter.contention,
            },  # fmt: skip
            "intrinsic": intrinsic,
            "routing": routing,
        }
        learner.close()
        return result

    def switch_indices(self, trace: list[dict]) -> list[int]:
        return switch_indices(trace, streamed=self.strategy not in REFERENCE)

    def metrics(self, L, P, general, trace) -> dict:
        return run_metrics(L, P, general, trace, self.strategy not in REFERENCE, self.instruct)


def summarize(runs: list[dict]) -> dict:
    """Mean, std and count over runs (orders/seeds) of every metric and cost figure, per strategy."""
    out: dict[str, dict] = {}
    for r in runs:
        if r["status"] != "ok":
            continue
        values = {
            **r["metrics"],
            **{k: v for k, v in r["cost"].items() if isinstance(v, int | float)},
        }
        for key, v in values.items():
            if v is not None:
                out.setdefault(r["strategy"], {}).setdefault(key, []).append(float(v))
    return {s: {k: {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, "n": len(v)}
                for k, v in d.items()}
            for s, d in out.items()}  # fmt: skip
