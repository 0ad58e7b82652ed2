"""`herllm serve --add-token` and the refusals of `herllm serve` (no server is started)."""

from __future__ import annotations

import json

import pytest

from herllm.cli import main
from herllm.serve.auth import TokenFile, hash_token


def test_add_token_prints_it_once_and_stores_only_its_hash(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["serve", str(run), "--add-token", "alice"]) == 0
    assert main(["serve", str(run), "--add-token", "root", "--admin"]) == 0
    out = capsys.readouterr().out.split()
    tokens = [w for w in out if w.startswith("hl-")]
    assert len(tokens) == 2
    stored = json.loads((run / "tokens.json").read_text())
    assert set(stored) == {hash_token(t) for t in tokens}
    assert not any(t in (run / "tokens.json").read_text() for t in tokens)
    assert (run / "tokens.json").stat().st_mode & 0o777 == 0o600
    tf = TokenFile.load(run / "tokens.json")
    assert tf.principal(tokens[0]).user == "alice" and not tf.principal(tokens[0]).admin
    assert tf.principal(tokens[1]).admin and tf.principal("hl-wrong") is None


def test_serve_refuses_a_run_without_tokens_and_a_foreign_model(tmp_path, capsys):
    from helpers import make_run

    run, _ = make_run(tmp_path)
    assert main(["serve", str(run), "--model", "smollm2-135m"]) == 2
    assert "is a run of model herllm-tiny" in capsys.readouterr().err
    assert main(["serve", str(run), "--tokens", str(tmp_path / "none.json")]) == 2
    assert "--add-token" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve"])
