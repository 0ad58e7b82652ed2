import pytest

from herllm.config import ConfigError, RunConfig, build_config, field_docs, save_yaml


def test_defaults_validate_and_every_field_is_documented():
    cfg = build_config()
    assert isinstance(cfg, RunConfig)
    import dataclasses

    for section in dataclasses.fields(RunConfig):
        cls = type(getattr(cfg, section.name))
        if dataclasses.is_dataclass(cls):
            docs = field_docs(cls)
            assert set(docs) == {f.name for f in dataclasses.fields(cls)}, cls


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        (["train.lrr=1"], r"unknown config key 'train.lrr'; allowed here: .*lr"),
        (["nosuch.x=1"], r"unknown config key 'nosuch'"),
        (
            ["select.policy=greedy"],
            r"select.policy='greedy' is not allowed; choose one of all, uncertain",
        ),
        (["replay.ratio=0.5", "replay.capacity=0"], r"needs a buffer"),
        (["replay.ratio=0.9", "train.batch_size=2"], r"leaves no new experiences"),
        (["train.batch_size=abc"], r"train.batch_size='abc' must be int"),
        (["checkpoint.keep=1"], r"checkpoint.keep=1 must be >= 2"),
    ],
)
def test_bad_config_is_one_clear_error(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        build_config(None, overrides)


def test_yaml_round_trip_and_override_precedence(tmp_path):
    cfg = build_config(None, ["train.lr=0.001", "stream.sources=[a.txt,b]"])
    path = tmp_path / "c.yaml"
    save_yaml(cfg, path)
    again = build_config(str(path), ["train.seed=7"])
    assert again.train.lr == 0.001 and again.stream.sources == ["a.txt", "b"]
    assert again.train.seed == 7


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml line \d+ is not valid YAML"):
        build_config(str(bad))
    with pytest.raises(ConfigError, match="does not exist"):
        build_config(str(tmp_path / "none.yaml"))
