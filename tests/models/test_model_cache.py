"""Conversion into the cache: once, atomically, again only when the package's file changes."""

from __future__ import annotations

import os
import threading
import time

import pytest
from model_fakes import FAKE, FakePackage

from herllm.config import ModelConfig
from herllm.models import cache
from herllm.models.load import load_base, resolve_model_path


@pytest.fixture()
def fake(monkeypatch, tmp_path, tiny_model_dir) -> FakePackage:
    return FakePackage(monkeypatch, tmp_path, tiny_model_dir)


def test_home_follows_herllm_home_then_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv("HERLLM_HOME", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_dir("m") == tmp_path / "xdg" / "herllm" / "models" / "m"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert cache.herllm_home() == tmp_path / "user" / ".cache" / "herllm"
    monkeypatch.setenv("HERLLM_HOME", str(tmp_path / "h"))
    assert cache.cache_dir("m") == tmp_path / "h" / "models" / "m"


def test_converts_once_then_loads_the_cached_folder(fake):
    path = resolve_model_path(FAKE.name)
    assert path == str(fake.folder) and fake.conversions == 1
    meta = cache.read_meta(fake.folder)
    assert (meta["file"], meta["size"]) == ("fake.gguf", fake.gguf.stat().st_size)
    assert meta["sha256"] == cache.sha256_of(fake.gguf) and meta["package_version"] == "1.0"
    stamp = (fake.folder / "model.safetensors").stat().st_mtime_ns
    model, tok = load_base(ModelConfig(name_or_path=FAKE.name))
    assert fake.conversions == 1 and model.config.vocab_size == len(tok)
    assert (fake.folder / "model.safetensors").stat().st_mtime_ns == stamp
    assert sorted(p.name for p in fake.folder.parent.iterdir()) == [".fake-gguf.lock", "fake-gguf"]


def test_a_changed_package_file_is_converted_again(fake):
    resolve_model_path(FAKE.name)
    st = fake.gguf.stat()
    os.utime(fake.gguf, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # reinstalled, same bytes
    resolve_model_path(FAKE.name)
    assert fake.conversions == 1
    data = bytearray(fake.gguf.read_bytes())
    data[-1] ^= 0xFF  # same size, new content
    fake.gguf.write_bytes(bytes(data))
    resolve_model_path(FAKE.name)
    assert fake.conversions == 2
    assert cache.read_meta(fake.folder)["sha256"] == cache.sha256_of(fake.gguf)
    fake.gguf.write_bytes(bytes(data) + b"more")
    resolve_model_path(FAKE.name)
    assert fake.conversions == 3
    leftovers = [p for p in fake.folder.parent.iterdir() if p.name.startswith((".old-", ".tmp-"))]
    assert leftovers == []


def test_an_interrupted_conversion_leaves_no_folder_that_loads(fake):
    fake.fail_after_files = 2  # config.json and generation_config.json written, then a crash
    with pytest.raises(RuntimeError, match="simulated crash"):
        resolve_model_path(FAKE.name)
    assert not fake.folder.exists()
    assert [p.name for p in fake.folder.parent.iterdir()] == [".fake-gguf.lock"]
    fake.fail_after_files = None
    assert resolve_model_path(FAKE.name) == str(fake.folder) and fake.conversions == 2


def test_leftovers_of_a_killed_conversion_are_ignored_then_removed(fake):
    models = fake.folder.parent
    models.mkdir(parents=True)
    (models / ".tmp-fake-gguf-abc123").mkdir()  # a process killed mid-write
    (models / ".tmp-fake-gguf-abc123" / "config.json").write_text("{}")
    other = models / ".tmp-fake-gguf-other-xyz"  # another model's conversion in progress
    other.mkdir()
    fake.folder.mkdir()  # a folder without its source record is not a finished conversion
    (fake.folder / "config.json").write_text("{}")
    assert not cache.is_complete(fake.folder)
    resolve_model_path(FAKE.name)
    assert fake.conversions == 1 and cache.is_complete(fake.folder)
    assert not (models / ".tmp-fake-gguf-abc123").exists() and other.exists()


def test_concurrent_first_uses_convert_once(fake, monkeypatch):
    def convert_slowly(gguf, out):
        time.sleep(0.5)  # the second thread arrives while the first holds the lock
        fake.convert(gguf, out)

    monkeypatch.setattr(cache, "convert_gguf", convert_slowly)
    results, said = [], []
    threads = [
        threading.Thread(target=lambda: results.append(cache.ensure_converted(FAKE, said.append)))
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [fake.folder, fake.folder] and fake.conversions == 1
    assert any(m.startswith("waiting for another process") for m in said)


def test_the_cache_serves_after_the_package_is_removed(fake):
    resolve_model_path(FAKE.name)
    fake.uninstall(FAKE.package)
    assert resolve_model_path(FAKE.name) == str(fake.folder) and fake.conversions == 1
