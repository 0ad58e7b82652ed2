"""Which adapter version answers: a version folder replaced under the same name is loaded anew,
and at start a version that cannot be loaded gives way to the next older one."""

from __future__ import annotations

import shutil

import pytest

from herllm.serve.versions import Versions


def publish(run, step: int, tag: str):
    d = run / "checkpoints" / f"step-{step:07d}"
    d.mkdir(parents=True)
    (d / "tag").write_text(tag)
    return d


def tag_loader(run, step):
    return (run / "checkpoints" / f"step-{step:07d}" / "tag").read_text()


def test_a_version_replaced_under_the_same_name_is_loaded_again(tmp_path):
    publish(tmp_path, 1, "first")
    versions = Versions(tmp_path, loader=tag_loader)
    assert versions.current() == ("step-0000001", "first")
    assert not versions.refresh()  # unchanged: no reload
    shutil.rmtree(tmp_path / "checkpoints" / "step-0000001")  # a resumed learner's prune ...
    publish(tmp_path, 1, "second")  # ... and its new step 1
    assert versions.refresh() and versions.current() == ("step-0000001", "second")


def test_at_start_an_unloadable_newest_version_gives_way_to_an_older_one(tmp_path):
    publish(tmp_path, 1, "old")
    (publish(tmp_path, 2, "half") / "tag").unlink()  # half-deleted by a learner killed mid-prune
    versions = Versions(tmp_path, loader=tag_loader)
    assert versions.current() == ("step-0000001", "old")
    (tmp_path / "checkpoints" / "step-0000002" / "tag").write_text("new")
    assert versions.refresh() and versions.current() == ("step-0000002", "new")
    only = tmp_path / "only"
    (publish(only, 3, "x") / "tag").unlink()
    with pytest.raises(FileNotFoundError):  # nothing loadable at all: the error, not a guess
        Versions(only, loader=tag_loader).current()
