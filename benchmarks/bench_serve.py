"""`herllm serve` under load: time to first token and tokens/s with 1, 4 and 16 concurrent
clients (streamed chat completions through the official openai client), with the learner idle
and with it training.

Starts the server in-process on a free localhost port over a new run of `--model` (knowledge
store BM25-only, so retrieval costs what a store lookup costs), sends `--requests` streamed
requests per client level (each client one after another), greedy, `--max-tokens` each.
Reports per level: p50 / p95 time to first token, p50 per-request decode rate (completion
tokens / time from first to last token), aggregate completion tokens per second of wall time,
and failed requests. Generation runs one request at a time (see herllm.serve.generation), so
time to first token grows with the queue.

`--learner training` runs the same levels again with `herllm adapt --follow RUN` beside the
server (a child process, as `herllm serve --learn` starts it, one thread), fed a backlog of
`--backlog` settled exchanges so that it has work for the whole measurement; it holds its steps
while a request is in flight, so it trains in the gaps between requests. Each level reports the
learner's steps during it (from its checkpoints, written every `--learner-ckpt` steps).

Usage:
    python benchmarks/bench_serve.py --model herllm-tiny --out /tmp/bench_serve.json
    python benchmarks/bench_serve.py --model smollm2-135m --requests 4 --out /tmp/bench_serve_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import openai

from herllm.memory.knowledge import KnowledgeStore
from herllm.serve.app import ServeDeps, serve_in_thread
from herllm.serve.auth import TokenFile, add_token
from herllm.serve.exchange import Limits
from herllm.serve.learn import create_run
from herllm.serve.log import LOG_FILE, InFlight, InteractionLog
from herllm.serve.log_source import INFLIGHT_FILE
from herllm.serve.versions import Versions

QUESTIONS = ["What does the river carry?", "Who keeps the ledger?", "Where does the rain fall?",
             "What burns in the window?"]  # fmt: skip


def start(model: str, root: Path, max_tokens: int, learner_ckpt: int):
    run = root / "run"
    create_run(run, model, settle=10.0, extra=[f"checkpoint.every_steps={learner_ckpt}"])
    token = add_token(run / "tokens.json", "bench")
    deps = ServeDeps(versions=Versions(run), log=InteractionLog(run / LOG_FILE),
                     tokens=TokenFile.load(run / "tokens.json"), model_name=model,
                     store=KnowledgeStore(run / "knowledge.sqlite", None),
                     in_flight=InFlight(run / INFLIGHT_FILE),
                     limits=Limits(max_tokens=max_tokens, default_max_tokens=max_tokens))  # fmt: skip
    server, url = serve_in_thread(deps)
    return server, url + "/v1", token, run, deps


def add_backlog(run: Path, deps, n: int) -> None:
    """`n` settled exchanges in the log (as the server writes them: the conversation rendered
    the way the model saw it), so the learner has work for the whole measurement."""
    from herllm.memory.knowledge import build_prompt
    from herllm.serve.log import Exchange

    tok = deps.versions.current()[1].tokenizer
    topics = ["rivers", "ledgers", "lamps", "valleys", "rain", "bread", "salt", "wind"]
    for i in range(n):
        t = topics[i % len(topics)]
        messages = [{"role": "user", "content": f"Tell me something about {t} (note {i})."}]
        answer = (f"Note {i}: {t} are kept by the keeper of the valley, who writes each one in "
                  f"the ledger by lamplight when the rain stops and the wind turns.")  # fmt: skip
        deps.log.append(Exchange(f"chatcmpl-backlog{i:05d}", "chat", "bench", deps.model_name,
                                 "base", messages, build_prompt([], messages, tok).text, answer,
                                 "stop", 20, 40, created=time.time() - 3600))  # fmt: skip


def learner_step(run: Path) -> int:
    from herllm.atomic import list_checkpoints

    steps = [s for s, _ in list_checkpoints(run / "checkpoints")]
    return max(steps) if steps else 0


def start_learner(run: Path, timeout: float = 900):
    """`herllm adapt --follow RUN` on one thread, running once its first checkpoint is out."""
    import os

    from herllm.serve.learn import LearnerProcess

    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        proc = LearnerProcess(run)
    finally:
        if old is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = old
    deadline = time.monotonic() + timeout
    while learner_step(run) == 0:
        if not proc.alive() or time.monotonic() > deadline:
            proc.stop(5)
            raise SystemExit(f"the learner did not train; see {run / 'learner.log'}")
        time.sleep(0.5)
    return proc


def one(client, model: str, max_tokens: int, q: str) -> dict:
    t0 = time.perf_counter()
    first = last = None
    n = 0
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": q}], max_tokens=max_tokens,
        temperature=0, stream=True, stream_options={"include_usage": True})  # fmt: skip
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
            last = time.perf_counter()
        if chunk.usage is not None:
            n = chunk.usage.completion_tokens
    first = first or time.perf_counter()
    last = last or first
    return {"ttft": first - t0, "tokens": n, "decode_s": last - first}


def level(url: str, token: str, model: str, clients: int, requests: int, max_tokens: int) -> dict:
    results, failures, lock = [], [], threading.Lock()

    def worker(i: int):
        c = openai.OpenAI(base_url=url, api_key=token, max_retries=0, timeout=600)
        for j in range(requests):
            try:
                r = one(c, model, max_tokens, QUESTIONS[(i + j) % len(QUESTIONS)])
                with lock:
                    results.append(r)
            except Exception as exc:  # noqa: BLE001 - counted and reported
                failures.append(repr(exc))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ttft = np.array([r["ttft"] for r in results])
    rate = np.array([r["tokens"] / r["decode_s"] for r in results if r["decode_s"] > 0])
    return {"clients": clients, "requests": len(results), "failed": len(failures),
            "ttft_p50_s": float(np.percentile(ttft, 50)), "ttft_p95_s": float(np.percentile(ttft, 95)),
            "decode_tok_s_p50": float(np.median(rate)) if len(rate) else None,
            "aggregate_tok_s": sum(r["tokens"] for r in results) / wall, "wall_s": wall,
            "failures": failures[:3]}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="herllm-tiny")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests", type=int, default=8, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--learner", nargs="+", choices=["idle", "training"],
                    default=["idle", "training"], help="measure with the learner idle, training")  # fmt: skip
    ap.add_argument("--backlog", type=int, default=400, help="settled exchanges for the learner")
    ap.add_argument("--learner-ckpt", type=int, default=2, help="learner checkpoint every N steps")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    import torch

    levels = []
    with tempfile.TemporaryDirectory() as tmp:
        server, url, token, run, deps = start(args.model, Path(tmp), args.max_tokens,
                                              args.learner_ckpt)  # fmt: skip
        warm = openai.OpenAI(base_url=url, api_key=token, max_retries=0)
        one(warm, args.model, 4, QUESTIONS[0])  # load and warm up
        learner = None
        try:
            for mode in args.learner:
                if mode == "training":
                    add_backlog(run, deps, args.backlog)
                    learner = start_learner(run)
                for n in args.clients:
                    before = learner_step(run)
                    lv = level(url, token, args.model, n, max(1, args.requests * 4 // n) if n > 4
                               else args.requests, args.max_tokens)  # fmt: skip
                    lv["learner"] = mode
                    lv["learner_steps"] = learner_step(run) - before if learner else 0
                    if learner is not None and not learner.alive():
                        lv["failures"].append("the learner exited")
                    levels.append(lv)
                    print(json.dumps(lv))
        finally:
            if learner is not None:
                learner.stop()
            server.should_exit = True
    out = {"model": args.model, "max_tokens": args.max_tokens, "torch_threads": torch.get_num_threads(),
           "learner_threads": 1, "learner_checkpoint_every": args.learner_ckpt,
           "machine": platform.processor() or platform.machine(), "levels": levels}  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps(out, indent=1))
    print("| learner | clients | requests | failed | TTFT p50 | TTFT p95 | decode p50 | aggregate "
          "| learner steps |\n|---|---|---|---|---|---|---|---|---|")  # fmt: skip
    for lv in levels:
        print(f"| {lv['learner']} | {lv['clients']} | {lv['requests']} | {lv['failed']} | "
              f"{lv['ttft_p50_s'] * 1000:.0f} ms | {lv['ttft_p95_s'] * 1000:.0f} ms | "
              f"{lv['decode_tok_s_p50']:.0f} tok/s | {lv['aggregate_tok_s']:.0f} tok/s | "
              f"{lv['learner_steps']} |")  # fmt: skip


if __name__ == "__main__":
    main()
