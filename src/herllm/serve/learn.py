"""The learner beside the server: a run that follows its own interaction log.

`herllm serve NEW_DIR` creates the run (config.yaml: `stream.sources` = the log,
`stream.follow`, the model, a strategy); `herllm adapt --follow RUN_DIR` (or `herllm serve
RUN_DIR --learn`, which starts it as a subprocess) resumes that run and follows the log through
the same loop as any stream: scoring, shift detection, selection, replay, protection, growth.
Each checkpoint it publishes is a new adapter version for the server.

A run made by `herllm adapt` on other sources can be served, but not learned from its log:
its cursor belongs to those sources (the learner says so in one line).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

from herllm.errors import UserError
from herllm.serve.log import LOG_FILE, InteractionLog

DEFAULT_STRATEGY = "replay"
RUN_DEFAULTS = (
    "checkpoint.keep=10",  # versions an admin can roll back to
    "checkpoint.every_steps=20",
    "stream.follow_poll=1.0",
    "train.batch_size=4",
    "train.warmup_steps=0",
)


def create_run(run_dir: Path, model: str, settle: float, strategy: str = DEFAULT_STRATEGY,
               extra: list[str] = ()) -> None:  # fmt: skip
    """A new run directory that learns from its interaction log (see module doc)."""
    from herllm.config import build_config
    from herllm.config.io import save_yaml
    from herllm.strategies import strategy_overrides

    run_dir.mkdir(parents=True, exist_ok=True)
    InteractionLog(run_dir / LOG_FILE).close()
    log = str((run_dir / LOG_FILE).resolve())
    overrides = [*strategy_overrides(strategy), f"strategy={strategy}", *RUN_DEFAULTS,
                 f"model.name_or_path={model}", f"run_dir={run_dir.resolve()}",
                 f"stream.sources=[{log}]", "stream.follow=true",
                 f"stream.follow_settle={settle}", *extra]  # fmt: skip
    save_yaml(build_config(None, overrides), run_dir / "config.yaml")


def follows_log(run_dir: Path) -> bool:
    """Whether `run_dir` is a run whose stream is its own interaction log."""
    from herllm.config import build_config

    if not (run_dir / "config.yaml").is_file() or not (run_dir / LOG_FILE).is_file():
        return False
    sources = build_config(str(run_dir / "config.yaml"), []).stream.sources
    return [Path(s).resolve() for s in sources] == [(run_dir / LOG_FILE).resolve()]


def adapt_args_for_log(args: argparse.Namespace) -> argparse.Namespace:
    """`herllm adapt --follow RUN_DIR` where RUN_DIR holds an interaction log: resume that
    run, whose stream is the log (its first start, too: a run without a checkpoint starts)."""
    import herllm.serve.log_source  # noqa: F401 - registers the log as a followed kind

    if args.resume or len(args.sources) != 1 or not (Path(args.sources[0]) / LOG_FILE).is_file():
        return args
    run = Path(args.sources[0])
    if not follows_log(run):
        raise UserError(
            f"{run} holds an interaction log but its run learns from other sources; serve a run "
            "made by herllm serve NEW_DIR to learn from the log"
        )
    args.resume, args.sources = str(run), []
    return args


def _term_with_parent() -> None:
    """Linux: the learner gets SIGTERM (checkpoint, exit) when the server dies, even by kill -9."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6").prctl(pr_set_pdeathsig, signal.SIGTERM)


class LearnerProcess:
    """`herllm adapt --follow RUN_DIR` as a child process of the server."""

    def __init__(self, run_dir: Path, log_file: Path | None = None):
        self.run_dir, self.log_file = run_dir, log_file or run_dir / "learner.log"
        self.start()

    def start(self) -> None:
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        cmd = [sys.executable, "-m", "herllm.cli", "adapt", "--follow", str(self.run_dir),
               "--quiet"]  # fmt: skip
        out = open(self.log_file, "ab")  # noqa: SIM115 - the child's
        self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                     preexec_fn=_term_with_parent)  # fmt: skip
        out.close()

    def restart(self) -> None:
        """Start it again after `stop` (it resumes from the newest checkpoint)."""
        if self.proc.poll() is not None:
            self.start()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM (the learner checkpoints, then exits); SIGKILL after `timeout`."""
        return terminate(self.proc, timeout)


def terminate(proc: subprocess.Popen, timeout: float) -> int | None:
    """SIGTERM a child (a learner checkpoints, a server shuts down), SIGKILL after `timeout`;
    its exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode
