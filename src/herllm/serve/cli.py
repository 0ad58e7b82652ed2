"""`herllm serve RUN_DIR`: the OpenAI-compatible server (and, with --learn, its learner).

    herllm serve runs/chat --model herllm-tiny --add-token alice       # prints a token once
    herllm serve runs/chat --add-token root --admin
    herllm serve runs/chat --learn                                      # http://127.0.0.1:8000/

A RUN_DIR that does not exist yet becomes a run that learns from its interaction log (default
model smollm2-135m). It binds to 127.0.0.1 unless --host says otherwise.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from herllm.errors import UserError

DEFAULT_MODEL = "smollm2-135m"


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="an OpenAI-compatible server over a run's adapters")
    p.add_argument("run_dir", help="a run directory (a new one is created)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--tokens", help="token file (default RUN_DIR/tokens.json)")
    p.add_argument("--model", help=f"model of a new run (default {DEFAULT_MODEL})")
    p.add_argument("--learn", action="store_true",
                   help="start the learner beside the server (herllm adapt --follow RUN_DIR)")  # fmt: skip
    p.add_argument("--settle", type=float, default=10.0,
                   help="new run: seconds an exchange waits for feedback before it is learned")  # fmt: skip
    p.add_argument("--strategy", default=None, help="new run: the learner's strategy (replay)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="new run: config override, e.g. train.lr=1e-4")  # fmt: skip
    p.add_argument("--encoder", default=None,
                   help="knowledge store encoder: minilm, tiny, lm:PATH or none (BM25 only); "
                   "default: the store's own, else minilm")  # fmt: skip
    p.add_argument("--max-tokens", type=int, default=512, help="most tokens a request may ask")
    p.add_argument("--add-token", metavar="USER", help="make a token for USER, print it, exit")
    p.add_argument("--admin", action="store_true", help="with --add-token: an admin token")
    p.set_defaults(func=cmd_serve)
    return p


def tokens_path(args) -> Path:
    return Path(args.tokens) if args.tokens else Path(args.run_dir) / "tokens.json"


def cmd_serve(args: argparse.Namespace) -> int:
    from herllm.serve.auth import add_token

    if args.add_token:
        token = add_token(tokens_path(args), args.add_token, args.admin)
        role = "admin " if args.admin else ""
        print(f"{role}token for {args.add_token} (shown once; only its hash is stored in "
              f"{tokens_path(args)}):\n{token}")  # fmt: skip
        return 0
    import uvicorn

    from herllm.serve.app import create_app

    deps, learner = build_deps(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    print(f"herllm serve: {deps.model_name} from {args.run_dir} on http://{args.host}:{args.port}/")
    if learner is not None:
        deps.on_shutdown.append(learner.stop)
    uvicorn.run(create_app(deps), host=args.host, port=args.port, log_level="warning")
    return 0


def open_store(run_dir: Path, encoder: str | None):
    from herllm.memory.knowledge import KnowledgeStore, load_encoder, stored_encoder

    path = run_dir / "knowledge.sqlite"
    spec = encoder
    if spec is None:
        stored = stored_encoder(path) if path.is_file() else None
        spec = stored[1] if stored else "minilm"
    return KnowledgeStore(path, None if spec == "none" else load_encoder(spec), actor="serve")


def build_deps(args):
    from herllm.config import build_config
    from herllm.serve.app import ServeDeps
    from herllm.serve.auth import TokenFile
    from herllm.serve.exchange import Limits
    from herllm.serve.learn import LearnerProcess, create_run, follows_log
    from herllm.serve.log import LOG_FILE, InFlight, InteractionLog
    from herllm.serve.log_source import INFLIGHT_FILE
    from herllm.serve.versions import Versions

    run = Path(args.run_dir)
    if not (run / "config.yaml").is_file():
        if run.exists() and any(p.name != "tokens.json" for p in run.iterdir()):
            raise UserError(f"{run} is neither a run directory nor empty; give a new directory")
        extra = list(args.set)
        create_run(run, args.model or DEFAULT_MODEL, args.settle, args.strategy or "replay", extra)
    model = build_config(str(run / "config.yaml"), []).model.name_or_path
    if args.model and args.model != model:
        raise UserError(f"{run} is a run of model {model}; drop --model {args.model} or give a "
                        "new directory")  # fmt: skip
    tokens = TokenFile.load(tokens_path(args))
    if args.max_tokens < 1:
        raise UserError(f"--max-tokens {args.max_tokens}: give at least 1")
    deps = ServeDeps(
        versions=Versions(run), log=InteractionLog(run / LOG_FILE), tokens=tokens,
        model_name=Path(model).name, store=open_store(run, args.encoder),
        in_flight=InFlight(run / INFLIGHT_FILE),
        limits=Limits(max_tokens=args.max_tokens, default_max_tokens=min(128, args.max_tokens)),
    )  # fmt: skip
    learner = None
    if args.learn:
        if not follows_log(run):
            raise UserError(f"--learn: {run} learns from other sources, not its interaction "
                            "log; serve a new directory to learn from the log")  # fmt: skip
        learner = deps.learner = LearnerProcess(run)
    return deps, learner
