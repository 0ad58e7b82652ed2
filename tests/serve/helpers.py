"""Helpers of the serve tests: a run made by `herllm serve`, versions published by hand, and a
live uvicorn server on a free localhost port."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import torch

from herllm import atomic
from herllm.serve.app import ServeDeps, create_app
from herllm.serve.auth import TokenFile, add_token
from herllm.serve.learn import create_run
from herllm.serve.log import LOG_FILE, InFlight, InteractionLog
from herllm.serve.log_source import INFLIGHT_FILE
from herllm.serve.versions import LOAD_LOCK, Versions


def make_run(root: Path, settle: float = 0.0) -> tuple[Path, dict[str, str]]:
    """A herllm-tiny run that follows its log, and tokens for alice, bob and an admin."""
    run = root / "run"
    create_run(run, "herllm-tiny", settle, extra=["stream.seq_len=64"])
    tokens = {name: add_token(run / "tokens.json", name, admin=name == "root")
              for name in ("alice", "bob", "root")}  # fmt: skip
    return run, tokens


def publish_version(run: Path, step: int, seed: int) -> Path:
    """A checkpoint `step` whose LoRA B weights are random (seeded): a version that answers
    differently from the base model and from other seeds."""
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    from herllm.config import build_config
    from herllm.models.load import ADAPTER_NAME, attach_lora, load_base

    cfg = build_config(str(run / "config.yaml"), [])
    with LOAD_LOCK:  # the server's watcher may be loading a version right now
        model = attach_lora(load_base(cfg.model)[0], cfg.lora)
    g = torch.Generator().manual_seed(seed)
    state = {k: (torch.randn(v.shape, generator=g) * 0.5 if "lora_B" in k else v)
             for k, v in get_peft_model_state_dict(model).items()}  # fmt: skip
    set_peft_model_state_dict(model, state)
    tmp = atomic.begin(run / "checkpoints", step)
    model.save_pretrained(tmp / "adapters" / ADAPTER_NAME, selected_adapters=[ADAPTER_NAME])
    torch.save({"format": 2, "bank": None, "step": step}, tmp / "trainer.pt")
    return atomic.publish(tmp)


def make_deps(run: Path, **kw) -> ServeDeps:
    from herllm.memory.knowledge import KnowledgeStore

    kw.setdefault("watch_poll", 0.1)
    return ServeDeps(versions=Versions(run), log=InteractionLog(run / LOG_FILE),
                     tokens=TokenFile.load(run / "tokens.json"), model_name="herllm-tiny",
                     store=KnowledgeStore(run / "knowledge.sqlite", None),
                     in_flight=InFlight(run / INFLIGHT_FILE), **kw)  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn serving `create_app(deps)` in a thread on 127.0.0.1."""

    def __init__(self, deps: ServeDeps):
        import uvicorn

        self.deps = deps
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(create_app(deps), host="127.0.0.1", port=self.port,
                                log_level="warning")  # fmt: skip
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
