"""The `herllm` subcommands (each `cmd_NAME(args) -> exit code`); parsers are in `cli`."""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
from pathlib import Path

from herllm.cli.flags import _q, overrides_from_args
from herllm.errors import UserError


def cmd_adapt(args: argparse.Namespace) -> int:
    from herllm.config import build_config
    from herllm.run.learner import Learner

    if args.follow:  # `--follow RUN_DIR` with an interaction log: that run, following its log
        from herllm.serve.learn import adapt_args_for_log

        args = adapt_args_for_log(args)
    overrides = overrides_from_args(args) + list(args.set)
    if args.strategy:
        from herllm.strategies import strategy_overrides

        overrides = strategy_overrides(args.strategy) + [f"strategy={args.strategy}"] + overrides
    if args.sources:
        overrides.append("stream.sources=[" + ",".join(_q(s) for s in args.sources) + "]")
    if args.follow:
        overrides.append("stream.follow=true")
    if args.resume:
        run = Path(args.resume)
        if not (run / "config.yaml").is_file():
            raise UserError(
                f"--resume {run}: no config.yaml there; pass the run directory of an earlier `herllm adapt`"
            )
        cfg = build_config(str(run / "config.yaml"), overrides + [f"run_dir={_q(str(run))}"])
    else:
        cfg = build_config(args.config, overrides)
        if not cfg.stream.sources:
            raise UserError(
                "no stream sources given; pass files, directories or - (stdin) to herllm adapt"
            )
    with Learner(cfg, resume=bool(args.resume), show_progress=not args.quiet) as learner:
        if cfg.stream.follow:  # a followed stream never ends: these stop it, checkpoint first
            signal.signal(signal.SIGTERM, learner.stop)
            signal.signal(signal.SIGINT, learner.stop)
        summary = learner.run()
    if not learner.s.ranks.main:
        return 0  # on N processes rank 0 prints the summary and writes the report
    print_summary(summary)
    print(f"report: {write_report(summary)}")
    return 0


def write_report(summary) -> Path:
    from herllm.evaluate.run_report import write_run_report

    return write_run_report(summary.run_dir, dataclasses.asdict(summary))


def print_summary(summary) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="herllm adapt: summary", show_header=False)
    for key, value in dataclasses.asdict(summary).items():
        if key in ("eval_first", "eval_last"):
            continue
        table.add_row(
            key,
            f"{value:,.1f}"
            if isinstance(value, float)
            else f"{value:,}"
            if isinstance(value, int)
            else str(value),
        )
    for name, before in summary.eval_first.items():
        after = summary.eval_last.get(name, float("nan"))
        table.add_row(f"held-out NLL {name}", f"{before:.4f} -> {after:.4f}")
    Console().print(table)


def cmd_demo(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from herllm.demo import run_demo

    summary = run_demo(args.root, quiet=args.quiet)
    print_summary(summary)
    table = Table(title="held-out loss per domain (mean token NLL, nats)")
    for col in ("domain", "before", "after", "change"):
        table.add_column(col, justify="left" if col == "domain" else "right")
    for name, before in summary.eval_first.items():
        after = summary.eval_last[name]
        table.add_row(Path(name).stem, f"{before:.4f}", f"{after:.4f}", f"{after - before:+.4f}")
    Console().print(table)
    print(f"run directory: {summary.run_dir}  (metrics.jsonl, checkpoints/, replay.sqlite)")
    print(f"report: {write_report(summary)}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import shlex

    from herllm.bench.report import render_report
    from herllm.bench.runner import BenchConfig, run_bench
    from herllm.config import apply_overrides, from_dict

    if args.scenario == "knowledge":
        from herllm.bench.knowledge import main_from_args

        return main_from_args(
            args, overrides_from_args(args), shlex.join(["herllm", *sys.argv[1:]])
        )
    bc = from_dict(BenchConfig, apply_overrides({}, overrides_from_args(args)))

    results = run_bench(
        bc,
        progress=(lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr)),
        command=shlex.join(["herllm", *sys.argv[1:]]),
    )
    md, html = render_report(Path(bc.out))
    bad = [f"{r['strategy']} ({r['status']})" for r in results["runs"] if r["status"] != "ok"]
    print(f"results: {Path(bc.out) / 'results.json'}\nreport: {md}\n        {html}")
    if bad:
        print(f"not run: {', '.join(sorted(set(bad)))}; see the report for why")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from herllm.bench.report import report_main

    return report_main(args.results_dir)


def cmd_ledger(args: argparse.Namespace) -> int:
    import json

    from rich.console import Console
    from rich.table import Table

    from herllm.memory.ledger import read_ledger, unit_table

    records = read_ledger(args.run)
    if args.json:
        for r in records:
            print(json.dumps(r))
        return 0
    table = Table(title=f"knowledge units of {args.run}")
    for col in (
        "unit",
        "status",
        "steps",
        "tokens",
        "seen",
        "selected",
        "opened by",
        "ref. loss",
        "depends on",
    ):
        table.add_column(col, no_wrap=col == "unit")
    for u in unit_table(records):
        ev = u.get("opened_by")
        table.add_row(
            u["unit"], u["status"] + (" (rolled back to)" if u.get("rollbacks") else ""),
            f"{u['opened_step']}-{u.get('closed_step', '')}", f"{u['opened_tokens']:,}-{u.get('closed_tokens', '')}",
            str(u.get("samples_seen", "")), str(u.get("samples_selected", "")),
            f"shift ({ev['direction']}, z={ev['rep_z']:.1f})" if ev else "start",
            f"{u['reference_loss']:.3f}" if "reference_loss" in u else "",
            ", ".join(d["unit"] for d in u.get("dependencies", [])),
        )  # fmt: skip
    Console().print(table)
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from herllm.run.rollback import rollback

    path = rollback(args.run, args.to)
    print(
        f"rolled back {args.run} to {args.to}: new checkpoint {path}; continue with herllm adapt --resume {args.run}"
    )
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from herllm.infer.adapted import AdaptedModel

    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {args.max_new_tokens} must be >= 1")
    if args.k is not None and args.k < 1:
        raise UserError(f"--k {args.k} must be >= 1 (or pass --no-knowledge)")
    m = AdaptedModel.from_run(args.run, knowledge=not args.no_knowledge)
    opts = dict(user=args.user, k=args.k)
    gen = (args.adapter, args.max_new_tokens, args.temperature, args.seed)
    if args.chat:
        outs, used = [], []
        for prompt in args.prompt:
            outs.append(m.chat([{"role": "user", "content": prompt}], *gen, **opts))
            used += m.last_retrieval
    else:
        outs = m.generate(args.prompt, *gen, **opts)
        used = m.last_retrieval
    routes = [args.adapter or r for r in m.routes(args.prompt, chat=args.chat)]
    for prompt, route, out, hits in zip(args.prompt, routes, outs, used, strict=True):
        if hits:  # which passages the answer was given, on stderr: stdout stays the answers
            ids = ", ".join(f"{h.item.id} ({h.item.doc_id or 'no doc'})" for h in hits)
            print(f"[knowledge] {len(hits)} passage(s): {ids}", file=sys.stderr)
        print(f"[{route}] {out}" if args.chat else f"[{route}] {prompt}{out}")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from herllm.config import apply_overrides, from_dict
    from herllm.models.pretrain import PretrainConfig, run_pretrain

    cfg = from_dict(PretrainConfig, apply_overrides({}, overrides_from_args(args)))
    out = run_pretrain(cfg, resume=args.resume)
    print(f"pretrained model written to {out}")
    return 0
