"""`herllm` command line: adapt | demo | bench | report | ledger | rollback | generate | models |
knowledge | pretrain.

Every config field is a flag, generated from the dataclasses: `--train.lr 1e-4`,
`--replay.ratio 0.25`, ... with the field's docstring as help (`cli.flags`). A few common ones
have short aliases. User mistakes print one line `herllm: error: ...` and exit with code 2.
The commands themselves are in `cli.commands`; a new one is a parser here and a `cmd_*` there.
"""

from __future__ import annotations

import argparse
import os
import sys

from herllm.cli.commands import (
    cmd_adapt,
    cmd_bench,
    cmd_demo,
    cmd_generate,
    cmd_ledger,
    cmd_pretrain,
    cmd_report,
    cmd_rollback,
)
from herllm.cli.flags import ALIASES, LIST_ALIASES, add_dataclass_flags
from herllm.errors import UserError
from herllm.memory.knowledge import cli as knowledge_cli
from herllm.models import cli as models_cli
from herllm.serve import cli as serve_cli


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
        "--follow",
        action="store_true",
        help="keep reading the sources as they grow (new JSONL lines, new files in a folder); "
        "stop with SIGTERM or Ctrl-C, which checkpoint first",
    )
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
    bench.add_argument(
        "--scenario",
        choices=("domains", "knowledge"),
        default="domains",
        help="domains: the domain stream (default); knowledge: Fictional Knowledge",
    )
    from herllm.bench.knowledge import KnowledgeBenchConfig

    for flag in ("data", "docs", "passes"):  # short forms of the knowledge scenario's own flags
        bench.add_argument(f"--{flag}", dest=f"cfg:knowledge.{flag}", default=argparse.SUPPRESS)
    add_dataclass_flags(bench, KnowledgeBenchConfig, prefix="knowledge.")
    bench.add_argument("--quick", action="store_true", help="knowledge: herllm-tiny, minutes")
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
    gen.add_argument(
        "--chat",
        action="store_true",
        help="each prompt is a user message: render it with the model's chat template and "
        "print only the assistant's reply",
    )
    gen.add_argument(
        "--user",
        metavar="NAME",
        help="answer with user:NAME's passages (and the run's); default: the run's scope, "
        "knowledge.scope or run:<run directory name>",
    )
    gen.add_argument(
        "--k", type=int, default=None, help="passages retrieved at most (default knowledge.k)"
    )
    gen.add_argument(
        "--no-knowledge",
        action="store_true",
        help="do not retrieve from the run's knowledge store (RUN/knowledge.sqlite)",
    )
    gen.set_defaults(func=cmd_generate)

    from herllm.models.pretrain import PretrainConfig

    models_cli.register(sub)  # herllm models: the registry, what is installed and cached
    knowledge_cli.register(sub)  # herllm knowledge add | search | forget | history | list
    serve_cli.register(sub)  # herllm serve RUN_DIR: the OpenAI-compatible server
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


def check_single_process(command: str, env: dict | None = None) -> None:
    """Only `adapt` runs on N processes; N copies of any other command would each do the whole
    job and write the same files."""
    from herllm.parallel.launch import launched_processes

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
