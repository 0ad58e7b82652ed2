"""`herllm serve` under load: time to first token and tokens/s with 1, 4 and 16 concurrent
clients (streamed chat completions through the official openai client), learner idle.

Starts the server in-process on a free localhost port over a new run of `--model` (knowledge
store BM25-only, so retrieval costs what a store lookup costs), sends `--requests` streamed
requests per client level (each client one after another), greedy, `--max-tokens` each.
Reports per level: p50 / p95 time to first token, p50 per-request decode rate (completion
tokens / time from first to last token), aggregate completion tokens per second of wall time,
and failed requests. Generation runs one request at a time (see herllm.serve.generation), so
time to first token grows with the queue.

Usage:
    OMP_NUM_THREADS=1 python benchmarks/bench_serve.py --model herllm-tiny --out /tmp/bench_serve.json
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
import uvicorn

from herllm.memory.knowledge import KnowledgeStore
from herllm.serve.app import ServeDeps, create_app
from herllm.serve.auth import TokenFile, add_token
from herllm.serve.exchange import Limits
from herllm.serve.learn import create_run
from herllm.serve.log import LOG_FILE, InFlight, InteractionLog
from herllm.serve.log_source import INFLIGHT_FILE
from herllm.serve.versions import Versions

QUESTIONS = ["What does the river carry?", "Who keeps the ledger?", "Where does the rain fall?",
             "What burns in the window?"]  # fmt: skip


def start(model: str, root: Path, max_tokens: int):
    run = root / "run"
    create_run(run, model, settle=10.0)
    token = add_token(run / "tokens.json", "bench")
    deps = ServeDeps(versions=Versions(run), log=InteractionLog(run / LOG_FILE),
                     tokens=TokenFile.load(run / "tokens.json"), model_name=model,
                     store=KnowledgeStore(run / "knowledge.sqlite", None),
                     in_flight=InFlight(run / INFLIGHT_FILE),
                     limits=Limits(max_tokens=max_tokens, default_max_tokens=max_tokens))  # fmt: skip
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(deps), host="127.0.0.1", port=port,
                                           log_level="warning"))  # fmt: skip
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{port}/v1", token


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
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        server, url, token = start(args.model, Path(tmp), args.max_tokens)
        warm = openai.OpenAI(base_url=url, api_key=token, max_retries=0)
        one(warm, args.model, 4, QUESTIONS[0])  # load and warm up
        levels = []
        for n in args.clients:
            levels.append(level(url, token, args.model, n, max(1, args.requests * 4 // n) if n > 4
                                else args.requests, args.max_tokens))  # fmt: skip
            print(json.dumps(levels[-1]))
        server.should_exit = True
    out = {"model": args.model, "max_tokens": args.max_tokens, "torch_threads": torch.get_num_threads(),
           "machine": platform.processor() or platform.machine(), "levels": levels}  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps(out, indent=1))
    for lv in levels:
        print(f"{lv['clients']:>2} clients: {lv['requests']} requests, {lv['failed']} failed; "
              f"TTFT p50 {lv['ttft_p50_s'] * 1000:.0f} ms, p95 {lv['ttft_p95_s'] * 1000:.0f} ms; "
              f"decode p50 {lv['decode_tok_s_p50']:.0f} tok/s; aggregate "
              f"{lv['aggregate_tok_s']:.0f} tok/s")  # fmt: skip


if __name__ == "__main__":
    main()
