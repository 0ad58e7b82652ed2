"""``herllm knowledge ...`` through register() on a fresh parser: a full round trip."""

from __future__ import annotations

import argparse
import json

import pytest

from herllm.errors import UserError
from herllm.memory.knowledge.cli import register


def _run(capsys, *argv: str) -> str:
    parser = argparse.ArgumentParser(prog="herllm")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["knowledge", *argv])
    assert args.func(args) == 0
    return capsys.readouterr().out


def _json(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines()]


def test_round_trip(tmp_path, capsys, fk10):
    run = ["--run", str(tmp_path / "run")]
    doc = tmp_path / "malm.txt"
    doc.write_text(fk10[0]["train_context"], encoding="utf-8")
    added = _json(_run(capsys, "add", *run, "--user", "alice", "--file", str(doc), "--json"))
    assert len(added) >= 2 and {a["doc_id"] for a in added} == {"malm.txt"}
    assert all(a["source"] == str(doc) and a["offsets"] for a in added)
    assert (tmp_path / "run" / "knowledge.sqlite").is_file()
    out = _run(capsys, "add", *run, "--user", "bob", "Bob's mayor is called Olaf Brun.")
    assert out.startswith("added ") and "user:bob" in out

    hits = _json(_run(capsys, "search", *run, "--user", "alice", "Who is the mayor?", "--json"))
    assert hits and {h["item"]["scope"]["id"] for h in hits} == {"alice"}
    assert "Karl Gustav" in hits[0]["item"]["text"] and hits[0]["item"]["retrieval_count"] == 1
    bob = _json(_run(capsys, "search", *run, "--user", "bob", "mayor", "--k", "3", "--json"))
    assert [h["item"]["text"] for h in bob] == ["Bob's mayor is called Olaf Brun."]
    assert "no passage found" in _run(
        capsys, "search", *run, "--user", "alice", "mayor", "--threshold", "0.99"
    )

    target = hits[0]["item"]["id"]
    with pytest.raises(UserError, match="belongs to user:alice, not user:bob"):
        _run(capsys, "forget", *run, "--user", "bob", target)
    assert f"forgot 1 version(s): {target}" in _run(
        capsys, "forget", *run, "--user", "alice", target
    )
    after = _json(_run(capsys, "search", *run, "--user", "alice", "Karl Gustav mayor", "--json"))
    assert target not in {h["item"]["id"] for h in after}

    listed = _json(_run(capsys, "list", *run, "--user", "alice", "--json"))
    assert len(listed) == len(added) - 1
    every = _json(_run(capsys, "list", *run, "--all", "--json"))
    assert len(every) == len(added) + 1
    events = _json(_run(capsys, "history", *run, "--json"))
    assert [e["action"] for e in events] == ["add"] * (len(added) + 1) + ["forget"]
    assert {e["actor"] for e in events} == {"cli"}
    mine = _run(capsys, "history", *run, target)
    assert mine.count(target) == 2 and "forget" in mine and "Karl" not in mine


def test_cli_mistakes_are_user_errors(tmp_path, capsys):
    store = str(tmp_path / "k.sqlite")
    with pytest.raises(UserError, match="give --store PATH or --run RUN_DIR"):
        _run(capsys, "add", "--user", "alice", "text")
    with pytest.raises(UserError, match="give the scope"):
        _run(capsys, "add", "--store", store, "text")
    with pytest.raises(UserError, match="no knowledge store at"):
        _run(capsys, "search", "--store", store, "--user", "alice", "query")
    with pytest.raises(UserError, match="no such file"):
        _run(capsys, "add", "--store", store, "--user", "a", "--file", str(tmp_path / "nope.txt"))
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"caf\xe9 au lait")
    with pytest.raises(UserError, match="not UTF-8"):
        _run(capsys, "add", "--store", store, "--user", "a", "--file", str(bad))
    _run(capsys, "add", "--store", store, "--user", "a", "A fact.", "--encoder", "tiny")
    with pytest.raises(UserError, match="open it with --encoder tiny"):
        _run(capsys, "search", "--store", store, "--user", "a", "fact", "--encoder", "minilm")
    assert "A fact." in _run(capsys, "search", "--store", store, "--user", "a", "fact")
