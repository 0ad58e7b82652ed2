"""``herllm knowledge add | search | forget | history | list``: :func:`register` adds them to
the main CLI's subparsers; each handler takes the parsed args and returns an exit code."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from herllm.errors import UserError
from herllm.memory.knowledge.records import Event, Hit, Item, Scope, stored_encoder
from herllm.memory.knowledge.retrieval import DEFAULT_ENCODER, MODES, load_encoder
from herllm.memory.knowledge.store import KnowledgeStore

STORE_FILE = "knowledge.sqlite"


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    where = common.add_mutually_exclusive_group()
    where.add_argument("--store", metavar="PATH", help="the knowledge store file")
    where.add_argument("--run", metavar="RUN_DIR", help=f"use RUN_DIR/{STORE_FILE}")
    scope = common.add_mutually_exclusive_group()
    scope.add_argument("--user", metavar="ID", help="scope user:ID")
    scope.add_argument("--agent", metavar="ID", help="scope agent:ID")
    scope.add_argument("--run-scope", metavar="ID", help="scope run:ID")
    common.add_argument("--actor", default="cli", help="who is recorded in the history")
    common.add_argument("--json", action="store_true", help="one JSON object per line")
    return common


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``knowledge`` and its five subcommands to ``subparsers``."""
    common = _common()
    knowledge = subparsers.add_parser("knowledge", help="the knowledge store (passages, scoped)")
    sub = knowledge.add_subparsers(dest="knowledge_command", required=True)
    add = sub.add_parser("add", parents=[common], help="store a passage or a whole document")
    add.add_argument("text", nargs="?", help="the passage (or give --file)")
    add.add_argument("--file", type=Path, help="a UTF-8 text document, split into passages")
    add.add_argument("--doc-id", help="document id (default: the file name)")
    add.add_argument("--source", help="provenance (default: the file path, or 'api')")
    add.add_argument("--encoder", help=f"minilm, tiny or lm:PATH (default {DEFAULT_ENCODER})")
    add.set_defaults(func=cmd_add)
    search = sub.add_parser("search", parents=[common], help="the passages best matching a query")
    search.add_argument("query")
    search.add_argument("--k", type=int, default=5, help="how many results (default 5)")
    search.add_argument("--threshold", type=float, help="minimum relevance (cosine)")
    search.add_argument("--mode", choices=MODES, help="retrieval mode (default hybrid)")
    search.add_argument(
        "--share", action="append", default=[], metavar="KIND:ID",
        help="also search this agent:ID or run:ID scope (repeatable)",
    )  # fmt: skip
    search.add_argument("--encoder", help="must be the store's encoder (default: the store's)")
    search.set_defaults(func=cmd_search)
    forget = sub.add_parser(
        "forget", parents=[common],
        help="erase an item (every version); with --run, from the adapter where consolidated",
    )  # fmt: skip
    forget.add_argument("item_id")
    forget.set_defaults(func=cmd_forget)
    history = sub.add_parser("history", parents=[common], help="the audit history")
    history.add_argument("item_id", nargs="?", help="only this item (all its versions)")
    history.set_defaults(func=cmd_history)
    listing = sub.add_parser("list", parents=[common], help="the items of a scope")
    listing.add_argument("--all", action="store_true", help="every version, not only active")
    listing.set_defaults(func=cmd_list)
    cons = sub.add_parser(
        "consolidate", parents=[common], help="distil stable items into the run's adapter"
    )
    cons.add_argument("--min-retrievals", type=int, default=1, help="stable: retrieved >= N")
    cons.add_argument("--passes", type=int, default=4, help="passes over the teacher's samples")
    cons.add_argument("--lr", type=float, default=1e-3, help="learning rate of the adapter")
    cons.add_argument("--rewrites", type=int, default=4, help="teacher rewrites per item")
    cons.add_argument("--shuffles", type=int, default=2, help="reorderings of each passage")
    cons.add_argument("--tolerance", type=float, default=0.02, help="gate: max NLL rise (share)")
    cons.add_argument("--earlier-keep", type=float, default=0.9,
                      help="gate: share of what earlier consolidations hold to keep")  # fmt: skip
    cons.add_argument("--replay-share", type=float, default=0.3,
                      help="earlier consolidations' samples replayed (share of the new tokens)")  # fmt: skip
    cons.add_argument("--undo", metavar="ENTRY", help="roll back consolidation ENTRY instead")
    cons.set_defaults(func=cmd_consolidate)
    return knowledge


def cmd_consolidate(args) -> int:
    from herllm.memory.knowledge.consolidate_run import consolidate_run, undo_run

    if not args.run:
        raise UserError("herllm knowledge consolidate: give --run RUN_DIR (its store and adapter)")
    if args.undo:
        items, path = undo_run(args.run, args.undo)
        print(f"rolled back {args.undo} ({len(items)} items): checkpoint {path}")
        return 0
    res, path = consolidate_run(
        args.run, _scope(args, required=True), min_retrievals=args.min_retrievals,
        passes=args.passes, lr=args.lr, rewrites=args.rewrites, shuffles=args.shuffles,
        tolerance=args.tolerance, earlier_keep=args.earlier_keep, replay_share=args.replay_share,
        actor=args.actor,
    )  # fmt: skip
    what = f"{len(res.items)} items, KL {res.kl_before:.3f} -> {res.kl_after:.3f}"
    if args.json:
        print(json.dumps({"entry": res.entry, "accepted": res.accepted, "items": res.items,
                          "checkpoint": str(path) if path else None, "reason": res.reason}))  # fmt: skip
    elif res.accepted:
        print(f"consolidated {res.entry}: {what}; checkpoint {path}")
    else:
        print(f"rejected ({what}): {res.reason}; the adapter is unchanged")
    return 0 if res.accepted else 1


def _store_path(args) -> Path:
    if args.store:
        return Path(args.store)
    if args.run:
        return Path(args.run) / STORE_FILE
    raise UserError("herllm knowledge: give --store PATH or --run RUN_DIR")


def _scope(args, required: bool) -> Scope | None:
    for kind, value in (("user", args.user), ("agent", args.agent), ("run", args.run_scope)):
        if value is not None:
            return Scope(kind, value)
    if required:
        command = f"herllm knowledge {args.knowledge_command}"
        raise UserError(f"{command}: give the scope with --user, --agent or --run-scope ID")
    return None


def _open(args, *, need_encoder: bool, must_exist: bool = True) -> KnowledgeStore:
    path = _store_path(args)
    if must_exist and not path.is_file():
        raise UserError(f"no knowledge store at {path}: add to it first with herllm knowledge add")
    encoder = None
    if need_encoder:
        stored = stored_encoder(path)
        spec = getattr(args, "encoder", None) or (stored[1] if stored else DEFAULT_ENCODER)
        encoder = None if spec == "none" else load_encoder(spec)
    return KnowledgeStore(path, encoder, actor=args.actor)


def _item_line(item: Item) -> str:
    where = f" doc {item.doc_id}" if item.doc_id else ""
    if item.offsets:
        where += f" chars {item.offsets[0]}-{item.offsets[1]}"
    text = " ".join((item.text or "<forgotten>").split())
    return f"{item.id}  v{item.version} {item.status:<10} {item.scope}{where}  {text}"


def _emit(args, records: list[Item | Hit | Event], line) -> None:
    for record in records:
        print(json.dumps(asdict(record), default=str) if args.json else line(record))


def cmd_add(args) -> int:
    scope = _scope(args, required=True)
    if (args.text is None) == (args.file is None):
        raise UserError("herllm knowledge add: give the passage text or --file PATH (one of them)")
    with _open(args, need_encoder=True, must_exist=False) as store:
        if args.file is None:
            source = args.source or "api"
            items = [store.add(args.text, scope=scope, doc_id=args.doc_id, source=source)]
        else:
            text = _read_document(args.file)
            doc_id = args.doc_id or args.file.name
            items = store.ingest_document(text, doc_id, scope, args.source or str(args.file))
    _emit(args, items, lambda it: f"added {_item_line(it)}")
    return 0


def _read_document(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"--file {path}: no such file") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"--file {path}: not UTF-8 text (byte {exc.start}); convert it") from None


def cmd_search(args) -> int:
    scope = _scope(args, required=True)
    share = [Scope.parse(s) for s in args.share]
    with _open(args, need_encoder=args.mode != "bm25") as store:
        hits = store.search(
            args.query, scope=scope, k=args.k, threshold=args.threshold, share=share, mode=args.mode
        )
    _emit(args, hits, lambda h: f"{h.score:.3f} (rel {h.relevance:.3f})  {_item_line(h.item)}")
    if not hits and not args.json:
        print("no passage found")
    return 0


def cmd_forget(args) -> int:
    scope = _scope(args, required=False)
    with _open(args, need_encoder=False) as store:
        item = store.get(args.item_id)
        if scope is not None and item.scope != scope:
            raise UserError(f"knowledge item {args.item_id} belongs to {item.scope}, not {scope}")
        ids = store.forget(args.item_id)
    weights = None
    if args.run:  # the run's adapter too, where a consolidation absorbed the item
        from herllm.memory.knowledge.consolidate_run import forget_run

        res, path = forget_run(args.run, ids)
        weights = {"rolled_back": res.rolled_back, "checkpoint": str(path) if path else None,
                   "redone": [r.entry for r in res.redone if r.accepted]}  # fmt: skip
    if args.json:
        print(json.dumps({"forgotten": ids, "weights": weights}))
        return 0
    print(f"forgot {len(ids)} version(s): {', '.join(ids)}")
    if weights and weights["rolled_back"]:
        print(f"rolled back {', '.join(weights['rolled_back'])} and consolidated the other items "
              f"again ({', '.join(weights['redone']) or 'none'}): checkpoint {weights['checkpoint']}")  # fmt: skip
    return 0


def cmd_history(args) -> int:
    with _open(args, need_encoder=False) as store:
        events = store.history(args.item_id, _scope(args, required=False))

    def line(e: Event) -> str:
        detail = json.dumps(e.detail, sort_keys=True)
        what = f"{e.action:<11} {e.item_id} v{e.version} {e.scope}"
        return f"{e.seq:>5} {e.time} {what} by {e.actor} {detail}"

    _emit(args, events, line)
    return 0


def cmd_list(args) -> int:
    with _open(args, need_encoder=False) as store:
        items = store.list(_scope(args, required=False), status=None if args.all else "active")
    _emit(args, items, _item_line)
    return 0
