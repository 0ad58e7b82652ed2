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
        (
            ["select.scores=step", "select.policy=uncertain"],
            r"^select.scores=step .* select.policy=uncertain cannot skip it; set select.policy=all",
        ),
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


BAD_VALUES = [
    ("train.lr=-1", "train.lr=-1.0 must be > 0"),
    ("train.lr=nan", "train.lr=nan must be > 0"),
    ("train.weight_decay=-0.01", "train.weight_decay=-0.01 must be >= 0"),
    ("train.max_steps=-1", "train.max_steps=-1 must be >= 0"),
    ("train.max_tokens=-5", "train.max_tokens=-5 must be >= 0"),
    ("train.warmup_steps=-1", "train.warmup_steps=-1 must be >= 0"),
    ("train.grad_clip=-1", "train.grad_clip=-1.0 must be >= 0"),
    ("train.seed=-1", "train.seed=-1 must be in [0, 4294967296)"),
    ("train.batch_size=0", "train.batch_size=0 must be > 0"),
    ("replay.ratio=1.5", "replay.ratio=1.5 must be in [0, 1)"),
    ("replay.capacity=-1", "replay.capacity=-1 must be >= 0"),
    ("replay.alpha=-2", "replay.alpha=-2.0 must be >= 0"),
    ("replay.general_windows=0", "replay.general_windows=0 must be >= 1"),
    ("replay.policy=fifo", "replay.policy='fifo' is not allowed; choose one of reservoir, priority"),
    ("select.policy=greedy", "select.policy='greedy' is not allowed; choose one of all, uncertain"),
    ("select.fraction=0", "select.fraction=0.0 must be in (0, 1]"),
    ("select.window=0", "select.window=0 must be >= 1"),
    ("select.warmup=-1", "select.warmup=-1 must be >= 0"),
    ("protect.regularizers=[ewc,l2]",
     "protect.regularizers='l2' is not allowed; choose one of ewc, mas, si, kl"),
    ("protect.kl_reference=first", "protect.kl_reference='first' is not allowed; choose one of last, base"),
    ("protect.strength=0", "protect.strength=0.0 must be > 0"),
    ("protect.observe_every=0", "protect.observe_every=0 must be >= 1"),
    ("protect.reptile_every=-1", "protect.reptile_every=-1 must be >= 0"),
    ("protect.reptile_epsilon=1.5", "protect.reptile_epsilon=1.5 must be in (0, 1]"),
    ("protect.consolidate_batches=0", "protect.consolidate_batches=0 must be >= 1"),
    ("shift.warmup=1", "shift.warmup=1 must be >= 2"),
    ("shift.cooldown=-1", "shift.cooldown=-1 must be >= 0"),
    ("shift.reps=hidden", "shift.reps='hidden' is not allowed; choose one of base, model, embed"),
    ("expand.max_adapters=1", "expand.max_adapters=1 must be >= 2"),
    ("expand.reuse_radius=0", "expand.reuse_radius=0.0 must be > 0"),
    ("expand.orth_ratio=-0.1", "expand.orth_ratio=-0.1 must be in [0, 1]"),
    ("expand.compose=max", "expand.compose='max' is not allowed; choose one of route, sum"),
    ("lora.r=0", "lora.r=0 must be > 0"),
    ("lora.dropout=1", "lora.dropout=1.0 must be in [0, 1)"),
    ("stream.seq_len=1", "stream.seq_len=1 must be >= 2"),
    ("model.dtype=fp16", "model.dtype='fp16' is not allowed; choose one of auto, float32, bfloat16"),
    ("checkpoint.every_steps=0", "checkpoint.every_steps=0 must be > 0"),
    ("eval.max_windows=0", "eval.max_windows=0 must be >= 1"),
]  # fmt: skip


@pytest.mark.parametrize(("override", "message"), BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_every_bad_value_is_one_line_naming_the_field(override, message):
    with pytest.raises(ConfigError) as info:
        build_config(None, [override])
    assert str(info.value) == message
    assert "\n" not in str(info.value)


def test_a_bad_value_set_in_python_is_caught_by_validate():
    cfg = RunConfig()
    cfg.train.lr = -1.0
    with pytest.raises(ConfigError, match=r"^train.lr=-1.0 must be > 0$"):
        cfg.validate()


def test_every_numeric_field_declares_its_range():
    import dataclasses
    import typing

    from herllm.config import Range

    for section in dataclasses.fields(RunConfig):
        cls = type(getattr(RunConfig(), section.name))
        if not dataclasses.is_dataclass(cls):
            continue
        hints = typing.get_type_hints(cls, include_extras=True)
        plain = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if plain[f.name] in (int, float):
                meta = getattr(hints[f.name], "__metadata__", ())
                assert any(isinstance(m, Range) for m in meta), f"{section.name}.{f.name}"


def test_registry_names_are_the_config_choices():
    from herllm.memory.policies import replay_policy_names
    from herllm.refine.select import selector_names
    from herllm.update.registry import regularizer_names

    for key, names in [
        ("select.policy", selector_names()),
        ("replay.policy", replay_policy_names()),
    ]:
        for name in names:
            build_config(None, [f"{key}={name}"])
    build_config(None, [f"protect.regularizers=[{','.join(regularizer_names())}]"])


def test_cli_bad_lr_is_exit_2_and_one_line(capsys):
    from herllm.cli import main

    assert main(["adapt", "notes.txt", "--lr", "-1"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "herllm: error: train.lr=-1.0 must be > 0"
    assert "Traceback" not in err


def test_a_fractional_share_of_a_batch_is_kept_on_average_not_rounded_away():
    from herllm.config.sections import rows_at

    assert [rows_at(0.125, 4, t) for t in range(6)] == [0, 1, 0, 1, 0, 1]  # was 0 at every step
    assert [rows_at(0.25, 8, t) for t in range(4)] == [2, 2, 2, 2]  # whole rows: unchanged
    assert sum(rows_at(0.3, 10, t) for t in range(100)) == 300
    cfg = build_config(
        None, ["train.batch_size=4", "replay.ratio=0.125", "replay.general_ratio=0.125"]
    )
    assert cfg.replay_per_batch == cfg.general_per_batch == 1
    assert sum(cfg.replay_rows(t) for t in range(40)) == 20
