"""Learning from chats, measured through `herllm serve` (issue #17): the development half of
Fictional Knowledge told to the assistant as user messages, then every probe asked in a new
conversation: right away (the user's knowledge store), and again after the store's items were
consolidated into the run's adapter, with retrieval off (weights alone). Against `base` and
against the in-context ceiling, all through the same server and the official openai client.

What it does, in order (one in-process server over a new run, uvicorn on a free localhost port,
knowledge store with the MiniLM encoder as `herllm serve` builds it by default):

0. `herllm adapt --follow RUN` (the learner `herllm serve --learn` starts) runs until it has
   published its first checkpoint (step 0: the untrained adapter, i.e. the base model), then is
   stopped. `herllm knowledge consolidate --run RUN` needs a checkpoint to consolidate into; the
   learner does not keep running, so no weight change but consolidation's is measured.
1. tell: each document, cut into its passages (the store's own splitter, 100-200 words), each
   sent as one chat message "Remember this: PASSAGE" by user `teller`. The server stores a user
   statement (not ending in '?', >= 3 words) in `user:teller`: one item, or, over 2,000
   characters, its passages. `--tell whole` sends each document as one message instead (62 of
   the 65 are over 2,000 characters, so the server splits them with the same splitter).
2. ask, store on: every probe in a new conversation by `teller`.
3. consolidate: `consolidate_run(RUN, user:teller)`, the code path of `herllm knowledge
   consolidate --run RUN --user teller`, over the items retrieved at least once (stable); an
   accepted consolidation is a new checkpoint, which the server must swap to (checked through
   GET /v1/models and each answer's `system_fingerprint`).
4. ask, weights alone: the same probes by `fresh` (a second token whose scope holds nothing:
   the server has no per-request switch for retrieval, so an empty scope is how retrieval is
   off; every answer's `herllm.facts` must be empty, which re-checks isolation).
   `base` (user `base`, base weights, before consolidation) and `in-context` (user `context`,
   the probe's own document in the system message as the knowledge bench's in-context row).

Two framings of each probe (a cloze prefix whose continuation is the target):

* `chat`: the probe as a user question, `Continue the text: "PREFIX ..."?` (it ends with '?', so
  the server does not store it as a fact), POST /v1/chat/completions, greedy; EM of the reply.
  SmolLM2-135M does not answer cloze questions in a chat turn: with the document in context
  it scored 0-10% EM in every question framing tried (2 held-out documents), and 80/60/20%
  with the benchmark's framing.
* `cloze`: the knowledge bench's framing (`bench/knowledge.py`: the facts in the system message,
  the user turn "Continue the text.", the assistant turn starting with PREFIX). The chat route
  cannot start the assistant's turn, so this goes through POST /v1/completions with exactly the
  text the bench renders (`consolidate.render`), the facts being the items the chat route
  retrieved for the same probe (ids in `herllm.facts`) for the store row, the document for
  in-context, none for base and weights alone. These numbers compare with the bench's.

EM is `herllm.evaluate.knowledge.exact_match` (case and punctuation folded) of the greedy
continuation, `len(target tokens) + 2` new tokens for cloze (the bench's budget) and + 4 for chat.

Usage:
    python benchmarks/bench_chat_learning.py --out /tmp/chat_learning.json      # smollm2-135m, 4 docs
    python benchmarks/bench_chat_learning.py --model herllm-tiny --docs 2       # quick check
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import tempfile
import time
from math import nan
from pathlib import Path

KIND_NAMES = {"mem": "memorisation", "gen": "paraphrase", "hard_gen": "composition"}
TELL_PREFIX = "Remember this: "
USERS = ("teller", "fresh", "base", "context")
_SPLIT = re.compile(r"(?<=[.!?])\s+")


# ---- framing (pure functions, golden-tested in tests/serve/test_chat_learning_bench.py) -------


def question(prefix: str) -> str:
    """A probe's cloze prefix as a user question (ends with '?': not stored as a fact)."""
    return f'Continue the text: "{" ".join(prefix.split())} ..."?'


def tell_messages(text: str, how: str = "passages", prefix: str = TELL_PREFIX,
                  limit: int = 2000) -> list[str]:  # fmt: skip
    """The user messages that tell a document: one per passage of the store's splitter (a
    passage over ``limit`` characters with the prefix is cut at sentence ends), or the whole
    document as one message (``how="whole"``, whatever its length)."""
    from herllm.memory.knowledge import split_passages

    flat = " ".join(text.split())
    if how == "whole":
        return [prefix + flat]
    out = []
    for p in split_passages(text):
        piece = ""
        for s in _SPLIT.split(" ".join(p.text.split())):
            if piece and len(prefix) + len(piece) + 1 + len(s) > limit:
                out.append(prefix + piece)
                piece = ""
            piece = f"{piece} {s}".strip()
        if piece:
            out.append(prefix + piece)
    return out


def in_context_system(document: str) -> str:
    """The in-context row's system message: the facts block the bench and the server write."""
    from herllm.memory.knowledge.prompt import HEADER

    return f"{HEADER}\n- {' '.join(document.split())}"


# ---- the server ---------------------------------------------------------------------------


def first_checkpoint(run: Path, timeout: float = 600.0) -> float:
    """Run the learner until it publishes step 0 (see module doc), then stop it."""
    from herllm import atomic
    from herllm.serve.learn import LearnerProcess

    t0, learner = time.perf_counter(), LearnerProcess(run)
    try:
        while not atomic.list_checkpoints(run / "checkpoints"):
            if not learner.alive() or time.perf_counter() - t0 > timeout:
                log = (run / "learner.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"the learner published no checkpoint:\n{log}")
            time.sleep(0.5)
    finally:
        learner.stop()
    return time.perf_counter() - t0


def start_server(run: Path, model: str, encoder: str | None, max_tokens: int):

    from herllm.serve.app import ServeDeps, serve_in_thread
    from herllm.serve.auth import TokenFile, add_token
    from herllm.serve.cli import open_store
    from herllm.serve.exchange import Limits
    from herllm.serve.log import LOG_FILE, InFlight, InteractionLog
    from herllm.serve.log_source import INFLIGHT_FILE
    from herllm.serve.versions import Versions

    tokens = {u: add_token(run / "tokens.json", u) for u in USERS}
    deps = ServeDeps(versions=Versions(run), log=InteractionLog(run / LOG_FILE),
                     tokens=TokenFile.load(run / "tokens.json"), model_name=model,
                     store=open_store(run, encoder), in_flight=InFlight(run / INFLIGHT_FILE),
                     limits=Limits(max_tokens=max_tokens, default_max_tokens=max_tokens))  # fmt: skip
    server, url = serve_in_thread(deps)
    return server, deps, url + "/v1", tokens


def extra(resp) -> dict:
    return (resp.model_extra or {}).get("herllm") or {}


# ---- probing ------------------------------------------------------------------------------


class Asker:
    """Asks every probe of one row through the server, both framings; scores EM."""

    def __init__(self, url, tokens, model, tok, docs, probes, item_doc, store, framings):
        self.url, self.tokens, self.model, self.tok = url, tokens, model, tok
        self.docs, self.probes, self.item_doc, self.store = docs, probes, item_doc, store
        self.framings = framings

    def client(self, user: str):
        import openai

        return openai.OpenAI(base_url=self.url, api_key=self.tokens[user], max_retries=0,
                             timeout=600)  # fmt: skip

    def row(self, name: str, user: str, in_context: bool = False, progress=print) -> dict:
        from herllm.evaluate.knowledge import exact_match
        from herllm.memory.knowledge.distil import render

        c, t0, out = self.client(user), time.perf_counter(), []
        for i, (d, kind, prefix, target) in enumerate(self.probes):
            n_tgt = len(self.tok(" " + target.strip(), add_special_tokens=False)["input_ids"])
            rec = {"doc": d, "kind": kind, "target": target}
            doc = self.docs[d]["train_context"]
            passages: list[str] = [doc] if in_context else []
            try:  # chat framing: always asked (it is what retrieves for the store row)
                msgs = [{"role": "user", "content": question(prefix)}]
                if in_context:
                    msgs.insert(0, {"role": "system", "content": in_context_system(doc)})
                r = c.chat.completions.create(model=self.model, messages=msgs, temperature=0,
                                              max_tokens=n_tgt + 4, seed=0)  # fmt: skip
                facts = extra(r).get("facts") or []
                rec |= {"chat_reply": r.choices[0].message.content, "facts": facts,
                        "fact_docs": [self.item_doc.get(f) for f in facts],
                        "version": r.system_fingerprint,
                        "chat_em": float(exact_match(r.choices[0].message.content, target))}  # fmt: skip
                if not in_context:
                    passages = [self.store.get(f).text for f in facts]
            except Exception as exc:  # noqa: BLE001 - counted as failed, reported
                rec["chat_error"] = f"{type(exc).__name__}: {exc}"[:300]
            if "cloze" in self.framings and "chat_error" not in rec:
                try:
                    r = c.completions.create(model=self.model, temperature=0, seed=0,
                                             prompt=render(self.tok, prefix, passages),
                                             max_tokens=n_tgt + 2)  # fmt: skip
                    rec |= {"cloze_reply": r.choices[0].text,
                            "cloze_em": float(exact_match(r.choices[0].text, target))}  # fmt: skip
                except Exception as exc:  # noqa: BLE001
                    rec["cloze_error"] = f"{type(exc).__name__}: {exc}"[:300]
            out.append(rec)
            if (i + 1) % 25 == 0:
                progress(f"  {name}: {i + 1}/{len(self.probes)} probes")
        return summarize(name, user, out, time.perf_counter() - t0)


def summarize(name: str, user: str, rows: list[dict], seconds: float) -> dict:
    res = {"row": name, "user": user, "probes": len(rows), "seconds": round(seconds, 1),
           "versions": sorted({r["version"] for r in rows if r.get("version")})}  # fmt: skip
    for fr in ("chat", "cloze"):
        res[f"{fr}_failed"] = sum(1 for r in rows if f"{fr}_error" in r)
        for kind in KIND_NAMES:
            got = [r[f"{fr}_em"] for r in rows if r["kind"] == kind and f"{fr}_em" in r]
            res[f"{fr}_{kind}_em"] = sum(got) / len(got) if got else None
    with_facts = [r for r in rows if "facts" in r]
    res["facts_per_answer"] = (sum(len(r["facts"]) for r in with_facts) / len(with_facts)
                               if with_facts else None)  # fmt: skip
    if any(r.get("facts") for r in with_facts):
        res["hit@1"] = sum(1 for r in with_facts if r["fact_docs"][:1] == [r["doc"]]) / len(
            with_facts
        )
        res["hit@3"] = sum(1 for r in with_facts if r["doc"] in r["fact_docs"][:3]) / len(
            with_facts
        )
    res["answers"] = rows
    return res


# ---- the run --------------------------------------------------------------------------------


def wait_serving(client, model: str, version: str, timeout: float = 600.0) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        for card in client.models.list().data:
            info = card.model_extra or {}
            if card.id == f"{model}@{version}" and info.get("serving"):
                return time.perf_counter() - t0
        time.sleep(0.5)
    raise RuntimeError(f"the server did not swap to {version} within {timeout:.0f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument(
        "--data", default="", help="a Fictional Knowledge JSON file (default: dev half)"
    )
    ap.add_argument("--docs", type=int, default=4, help="the first N documents")
    ap.add_argument("--encoder", default=None, help="store encoder (default: minilm, as serve)")
    ap.add_argument("--tell", choices=("passages", "whole"), default="passages")
    ap.add_argument("--framings", default="chat,cloze", help="chat, or chat,cloze")
    ap.add_argument("--consolidate-lr", type=float, default=3e-4,
                    help="the knowledge bench's SmolLM2 setting (1e-3 was rejected by the gate)")  # fmt: skip
    ap.add_argument("--consolidate-passes", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=4, help="teacher prompts per item")
    ap.add_argument("--new-tokens", type=int, default=24, help="teacher tokens per prompt")
    ap.add_argument("--tolerance", type=float, default=0.02, help="gate: max general NLL rise")
    ap.add_argument("--min-retrievals", type=int, default=1)
    ap.add_argument("--run-dir", type=Path, help="keep the run here (default: a temp dir)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = args.run_dir or Path(tmp) / "run"
        result = bench(args, run)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1, default=str))
        print(f"results: {args.out}")
    print(table(result))


def bench(args, run: Path) -> dict:
    import openai
    import torch

    from herllm.bench.knowledge import load_documents
    from herllm.bench.knowledge_probes import Prober
    from herllm.errors import UserError
    from herllm.memory.knowledge import Scope
    from herllm.memory.knowledge.consolidate import ConsolidationResult
    from herllm.memory.knowledge.consolidate_run import consolidate_run
    from herllm.serve.exchange import FACT_MAX_CHARS, is_statement
    from herllm.serve.learn import create_run
    from herllm.serve.versions import LOAD_LOCK

    def say(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    t_all = time.perf_counter()
    docs = load_documents(args.data)[: args.docs]
    probes = Prober(None, docs).probes(list(range(len(docs))))
    framings = [f for f in args.framings.split(",") if f]
    over = sum(len(TELL_PREFIX + " ".join(d["train_context"].split())) > FACT_MAX_CHARS
               for d in docs)  # fmt: skip
    res: dict = {"model": args.model, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                 "machine": {"cpu": platform.processor() or platform.machine(),
                             "torch_threads": torch.get_num_threads()},
                 "size": {"docs": len(docs), "probes": len(probes),
                          "probes_per_kind": {k: sum(p[1] == k for p in probes) for k in KIND_NAMES},
                          "docs_over_fact_limit_whole": over},
                 "config": {k: str(v) for k, v in vars(args).items()}}  # fmt: skip
    create_run(run, args.model, settle=10.0)
    say("learner: first checkpoint (step 0, the untrained adapter)")
    res["learner_first_checkpoint_s"] = round(first_checkpoint(run), 1)
    server, deps, url, tokens = start_server(run, args.model, args.encoder, 512)
    try:
        tok = deps.versions.current()[1].tokenizer
        c = openai.OpenAI(base_url=url, api_key=tokens["teller"], max_retries=0, timeout=600)
        # 1. tell -----------------------------------------------------------------------------
        t0, sent, msg_doc = time.perf_counter(), 0, {}
        say(f"tell: {len(docs)} documents ({args.tell})")
        for d, doc in enumerate(docs):
            for m in tell_messages(doc["train_context"], args.tell):
                r = c.chat.completions.create(model=args.model, temperature=0, max_tokens=4,
                                              messages=[{"role": "user", "content": m}])  # fmt: skip
                msg_doc[r.id] = d
                sent += 1
        scope = Scope("user", "teller")
        items = deps.store.list(scope)
        item_doc = {it.id: msg_doc.get(it.doc_id) for it in items}
        stored_docs = {d for d in item_doc.values() if d is not None}
        res["tell"] = {"messages": sent, "statements": sum(
            is_statement(m) for doc in docs for m in tell_messages(doc["train_context"], args.tell)),
            "items_stored": len(items), "docs_with_items": len(stored_docs),
            "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
        say(f"tell: {res['tell']}")
        ask = Asker(url, tokens, args.model, tok, docs, probes, item_doc, deps.store, framings)
        rows = {}
        # 2. ask, store on; base and in-context on the same (base) weights --------------------
        for name, user, ctx in (("knowledge store", "teller", False), ("base", "base", False),
                                ("in-context (ceiling)", "context", True)):  # fmt: skip
            say(f"ask: {name}")
            rows[name] = ask.row(name, user, ctx, progress=say)
        res["tell"]["items_after_asking"] = len(deps.store.list(scope))
        # 3. consolidate --------------------------------------------------------------------
        say("consolidate user:teller into the run's adapter")
        stable = [it for it in deps.store.list(scope) if it.retrieval_count >= args.min_retrievals]
        t0 = time.perf_counter()
        try:
            with LOAD_LOCK:  # the server's watcher loads versions under it too
                cres, path = consolidate_run(run, scope, min_retrievals=args.min_retrievals,
                                             passes=args.consolidate_passes, lr=args.consolidate_lr,
                                             prompts=args.prompts, new_tokens=args.new_tokens,
                                             tolerance=args.tolerance, actor="bench")  # fmt: skip
        except UserError as exc:  # e.g. no stable item: reported, weights alone = base weights
            cres, path = (
                ConsolidationResult(None, False, [], nan, nan, {}, {}, 0, 0.0, str(exc)),
                None,
            )
        res["consolidation"] = {
            "seconds": round(time.perf_counter() - t0, 1), "accepted": cres.accepted,
            "reason": cres.reason, "entry": cres.entry, "items": len(cres.items),
            "items_in_scope": len(items), "stable_items": len(stable),
            "kl_before": cres.kl_before, "kl_after": cres.kl_after,
            "retention_before": cres.retention_before, "retention_after": cres.retention_after,
            "tokens_trained": cres.tokens_trained, "checkpoint": path.name if path else None,
        }  # fmt: skip
        say(f"consolidation: accepted={cres.accepted} in {res['consolidation']['seconds']} s")
        if path is not None:
            res["consolidation"]["swap_s"] = round(wait_serving(c, args.model, path.name), 1)
            res["consolidation"]["serving"] = [(m.id, (m.model_extra or {}).get("serving"))
                                               for m in c.models.list().data]  # fmt: skip
        # 4. weights alone --------------------------------------------------------------------
        say("ask: weights alone (user fresh, empty scope)")
        rows["weights alone"] = ask.row("weights alone", "fresh", progress=say)
        if path is not None:
            rows["weights alone"]["all_from_new_version"] = rows["weights alone"]["versions"] == [
                path.name
            ]
        res["isolation_ok"] = all(
            not a.get("facts") for n in ("base", "weights alone") for a in rows[n]["answers"]
        ) and all(not a.get("facts") for a in rows["in-context (ceiling)"]["answers"])
    finally:
        server.should_exit = True
    res["rows"] = rows
    res["wall_s"] = round(time.perf_counter() - t_all, 1)
    return res


def table(res: dict) -> str:
    def pct(x):
        return "—" if x is None else f"{100 * x:.0f}%"

    def nll(d):
        return f"{d['general']:.3f}" if d and "general" in d else "—"

    s = res["size"]
    lines = [f"{res['model']}, {s['docs']} documents, {s['probes']} probes "
             f"({'/'.join(str(v) for v in s['probes_per_kind'].values())} mem/para/comp), "
             f"{res['date']}, {res['wall_s']:.0f} s", "",
             "| row | version | chat mem | chat para | chat comp | cloze mem | cloze para | "
             "cloze comp | hit@1 | hit@3 | failed | s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    order = ("base", "in-context (ceiling)", "knowledge store", "weights alone")
    for name in order:
        r = res["rows"].get(name)
        if r is None:
            continue
        lines.append(
            f"| {name} | {', '.join(r['versions'])} | "
            + " | ".join(pct(r[f"{fr}_{k}_em"]) for fr in ("chat", "cloze") for k in KIND_NAMES)
            + f" | {pct(r.get('hit@1'))} | {pct(r.get('hit@3'))} | "
            f"{r['chat_failed']}+{r['cloze_failed']} | {r['seconds']:.0f} |"
        )
    cons = res.get("consolidation", {})
    t = res.get("tell", {})
    lines += ["", f"tell: {t.get('messages')} messages, {t.get('items_stored')} items stored "
              f"({t.get('docs_with_items')} documents), {t.get('seconds')} s; whole documents "
              f"over 2000 characters (stored as passages if told whole): "
              f"{s['docs_over_fact_limit_whole']} of {s['docs']}",
              f"consolidation: {'accepted' if cons.get('accepted') else 'rejected'} "
              f"({cons.get('items')} of {cons.get('items_in_scope')} items stable), "
              f"KL {cons.get('kl_before', float('nan')):.3f} -> {cons.get('kl_after', float('nan')):.3f}, "
              f"general NLL {nll(cons.get('retention_before'))} -> {nll(cons.get('retention_after'))}, "
              f"{cons.get('tokens_trained')} tokens, {cons.get('seconds')} s; "
              f"new version {cons.get('checkpoint')} serving after {cons.get('swap_s')} s",
              f"isolation (no facts for users with an empty scope): {res.get('isolation_ok')}"]  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
