"""`herllm` command line: adapt | pretrain (more subcommands register themselves here).

Every config field is a flag, generated from the dataclasses: `--train.lr 1e-4`,
`--replay.ratio 0.25`, ... with the field's docstring as help. A few common ones have short
aliases. User mistakes print one line `herllm: error: ...` and exit with code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import get_type_hints

from herllm.errors import UserError

ALIASES = {
    "--model": "model.name_or_path",
    "--run-dir": "run_dir",
    "--max-steps": "train.max_steps",
    "--max-tokens": "train.max_tokens",
    "--batch-size": "train.batch_size",
    "--lr": "train.lr",
    "--seed": "train.seed",
    "--seq-len": "stream.seq_len",
    "--on-bad-input": "stream.on_bad_input",
    "--select": "select.policy",
    "--replay-ratio": "replay.ratio",
    "--replay-policy": "replay.policy",
    "--lora-r": "lora.r",
}
LIST_ALIASES = {
    "--include": "stream.include",
    "--exclude": "stream.exclude",
    "--eval": "eval.files",
}


def tune_malloc() -> None:
    """Keep glibc from returning freed memory to the OS after every step (+16-55% on CPU).

    Environment variables only take effect at process start, so call mallopt directly.
    """
    if sys.platform != "linux" or os.environ.get("HERLLM_NO_MALLOPT"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4
        libc.mallopt(m_mmap_max, 0)
        libc.mallopt(m_trim_threshold, 0x7FFFFFFF)  # int max: never trim
    except OSError:
        pass


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type, prefix: str = "") -> None:
    """One `--section.field` flag per dataclass field (nested), help from its docstring."""
    from herllm.config import field_docs

    docs = field_docs(cls)
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            add_dataclass_flags(parser, hints[f.name], prefix=f"{name}.")
            continue
        flags = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
        flags = [f for f in flags if f not in parser._option_string_actions]  # aliases win
        if not flags:
            continue
        parser.add_argument(
            *flags,
            dest=f"cfg:{name}",
            default=argparse.SUPPRESS,
            metavar="V",
            help=docs.get(f.name, "").replace("%", "%%"),
        )


def overrides_from_args(args: argparse.Namespace) -> list[str]:
    out = []
    for key, value in vars(args).items():
        if key.startswith("cfg:"):
            out.append(f"{key[4:]}={value}")
        elif key.startswith("alias:") and value is not None:
            field = key[6:]
            out.append(
                f"{field}={value}"
                if not isinstance(value, list)
                else f"{field}=[{','.join(_q(v) for v in value)}]"
            )
    return out


def _q(v: str) -> str:
    return "'" + v.replace("'", "''") + "'"


def build_parser() -> argparse.ArgumentParser:
    from herllm.config import RunConfig

    parser = argparse.ArgumentParser(
        prog="herllm", description="Continual adaptation of causal LMs without forgetting."
    )
    parser.add_argument("--version", action="version", version=f"herllm {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    adapt = sub.add_parser("adapt", help="learn continually from a stream of documents")
    adapt.add_argument(
        "sources", nargs="*", help="text files, directories, JSONL files, or - for stdin"
    )
    adapt.add_argument("--config", help="YAML file mirroring the config dataclasses")
    adapt.add_argument("--resume", metavar="RUN", help="continue the run in this run directory")
    adapt.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override, e.g. train.lr=1e-4",
    )
    adapt.add_argument("--quiet", action="store_true", help="no progress bar")
    adapt.add_argument(
        "--strategy", help="a named preset (naive, replay, ...); flags given here override it"
    )
    for flag, field in ALIASES.items():
        adapt.add_argument(flag, dest=f"alias:{field}", default=None, help=f"alias of --{field}")
    for flag, field in LIST_ALIASES.items():
        adapt.add_argument(
            flag,
            dest=f"alias:{field}",
            action="append",
            default=None,
            help=f"alias of --{field} (repeatable)",
        )
    add_dataclass_flags(adapt, RunConfig)
    adapt.set_defaults(func=cmd_adapt)

    demo = sub.add_parser("demo", help="adapt the bundled model to a short bundled stream")
    demo.add_argument("--root", default="runs", help="where the demo stream and run directory go")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.set_defaults(func=cmd_demo)

    from herllm.bench.runner import BenchConfig

    bench = sub.add_parser(
        "bench", help="benchmark strategies on a domain stream; writes results + report"
    )
    bench.add_argument("--quiet", action="store_true", help="no per-run progress lines")
    add_dataclass_flags(bench, BenchConfig)
    bench.set_defaults(func=cmd_bench)

    report = sub.add_parser(
        "report", help="re-render report.md/report.html from RESULTS_DIR/results.json"
    )
    report.add_argument("results_dir", help="a directory written by herllm bench")
    report.set_defaults(func=cmd_report)

    ledger = sub.add_parser("ledger", help="print a run's knowledge units (the learning history)")
    ledger.add_argument("run", help="a run directory")
    ledger.add_argument("--json", action="store_true", help="print the raw ledger records")
    ledger.set_defaults(func=cmd_ledger)

    rb = sub.add_parser(
        "rollback", help="restore the adapters and trainer state saved when a unit closed"
    )
    rb.add_argument("run", help="a run directory")
    rb.add_argument(
        "--to", required=True, metavar="UNIT", help="unit id, e.g. unit-0002 (see herllm ledger)"
    )
    rb.set_defaults(func=cmd_rollback)

    gen = sub.add_parser(
        "generate", help="continue a prompt with a run's adapters, routed without a task id"
    )
    gen.add_argument("prompt", nargs="+", help="one or more prompts")
    gen.add_argument("--run", required=True, help="a run directory written by herllm adapt")
    gen.add_argument(
        "--adapter",
        default=None,
        help="force one adapter (name, unit id, or base) instead of routing",
    )
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--seed", type=int, default=0)
    gen.set_defaults(func=cmd_generate)

    from herllm.models.pretrain import PretrainConfig

    pre = sub.add_parser("pretrain", help="pretrain a small Llama base model from scratch")
    pre.add_argument(
        "--resume", action="store_true", help="continue from the newest checkpoint in --out"
    )
    add_dataclass_flags(pre, PretrainConfig)
    pre.set_defaults(func=cmd_pretrain)
    return parser


def _version() -> str:
    from herllm import __version__

    return __version__


def cmd_adapt(args: argparse.Namespace) -> int:
    from herllm.config import build_config
    from herllm.run.learner import Learner

    overrides = overrides_from_args(args) + list(args.set)
    if args.strategy:
        from herllm.strategies import strategy_overrides

        overrides = strategy_overrides(args.strategy) + [f"strategy={args.strategy}"] + overrides
    if args.sources:
        overrides.append("stream.sources=[" + ",".join(_q(s) for s in args.sources) + "]")
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
    from herllm.bench.report import render_report
    from herllm.bench.runner import BenchConfig, run_bench
    from herllm.config import apply_overrides, from_dict

    bc = from_dict(BenchConfig, apply_overrides({}, overrides_from_args(args)))
    import shlex

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
    from herllm.run.units import rollback

    path = rollback(args.run, args.to)
    print(
        f"rolled back {args.run} to {args.to}: new checkpoint {path}; continue with herllm adapt --resume {args.run}"
    )
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from herllm.infer.adapted import AdaptedModel

    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {args.max_new_tokens} must be >= 1")
    m = AdaptedModel.from_run(args.run)
    routes = [args.adapter or r for r in m.routes(args.prompt)]
    outs = m.generate(args.prompt, args.adapter, args.max_new_tokens, args.temperature, args.seed)
    for prompt, route, out in zip(args.prompt, routes, outs, strict=True):
        print(f"[{route}] {prompt}{out}")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from herllm.config import apply_overrides, from_dict
    from herllm.models.pretrain import PretrainConfig, run_pretrain

    cfg = from_dict(PretrainConfig, apply_overrides({}, overrides_from_args(args)))
    out = run_pretrain(cfg, resume=args.resume)
    print(f"pretrained model written to {out}")
    return 0


def check_single_process(command: str, env: dict | None = None) -> None:
    """Only `adapt` runs on N processes; N copies of any other command would each do the whole
    job and write the same files."""
    from herllm.parallel.ranks import launched_processes

    var, launched = launched_processes(env)
    if launched > 1:
        raise UserError(
            f"herllm {command} runs in one process, but the launcher started {launched} "
            f"({var}={launched}); run it without torchrun or accelerate launch (only "
            "`herllm adapt` runs on several processes)"
        )


def main(argv: list[str] | None = None) -> int:
    tune_malloc()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command != "adapt":
            check_single_process(args.command)
        return args.func(args)
    except UserError as exc:
        print(f"herllm: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("herllm: interrupted; the last checkpoint is intact (use --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
