"""A fake `pypi-gguf` model for fast tests: its package lookup, versions and converter are
monkeypatched, and the "conversion" copies a tiny Llama folder."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from herllm.models import cache, registry
from herllm.models.registry import ModelEntry

FAKE = ModelEntry(
    name="fake-gguf",
    description="a tiny Llama standing in for a packaged GGUF",
    license="Apache-2.0",
    parameters=1000,
    source="pypi-gguf",
    chat_template=False,
    package="fake-pkg",
    gguf_file="fake.gguf",
    needs=("fake-dep",),
)


class FakePackage:
    """`fake-pkg` installed in `tmp_path`, `HERLLM_HOME` in `tmp_path / "home"`."""

    def __init__(self, monkeypatch, tmp_path: Path, model_dir: Path):
        self.model_dir = model_dir
        self.gguf = tmp_path / "site-packages" / "fake_pkg" / FAKE.gguf_file
        self.gguf.parent.mkdir(parents=True)
        self.gguf.write_bytes(b"GGUF" + bytes(range(256)) * 4)
        self.versions = {FAKE.package: "1.0", "fake-dep": "2.0"}
        self.conversions = 0
        self.fail_after_files: int | None = None  # raise after copying this many files
        self.home = tmp_path / "home"
        monkeypatch.setenv("HERLLM_HOME", str(self.home))
        monkeypatch.setitem(registry._REGISTRY, FAKE.name, FAKE)
        monkeypatch.setattr(registry, "distribution_version", self.versions.get)
        monkeypatch.setattr(cache, "find_package_file", self.find)
        monkeypatch.setattr(cache, "convert_gguf", self.convert)

    @property
    def folder(self) -> Path:
        return self.home / "models" / FAKE.name

    def find(self, package: str, filename: str) -> Path | None:
        if package not in self.versions or not self.gguf.is_file():
            return None
        return self.gguf if filename == self.gguf.name else None

    def uninstall(self, name: str) -> None:
        self.versions.pop(name)

    def convert(self, gguf: Path, out: Path) -> None:
        assert gguf == self.gguf
        self.conversions += 1
        for i, f in enumerate(sorted(self.model_dir.iterdir())):
            if self.fail_after_files is not None and i == self.fail_after_files:
                raise RuntimeError("simulated crash in the middle of writing")
            shutil.copy(f, out / f.name)


def real_model_marks(name: str = "smollm2-135m") -> list:
    """`pytestmark` of a test module on the real model: slow, and skipped with the install
    command when its package is missing."""
    entry = registry.get_model(name)
    return [
        pytest.mark.slow,
        pytest.mark.skipif(
            not registry.installed(entry),
            reason=f"{name}'s package is not installed ({entry.install_command})",
        ),
    ]
