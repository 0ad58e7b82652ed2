"""Protection in the loop: every strategy runs, shifts close units, resume is exact, rollback
restores the weights bit-exactly."""

import random

import pytest
import torch
from safetensors.torch import load_file

from herllm.cli import main
from herllm.config import build_config
from herllm.memory.ledger import read_ledger, unit_table
from herllm.run.adapters_io import adapter_state
from herllm.run.learner import Learner
from herllm.strategies import STRATEGIES, strategy_overrides

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_regions(tmp_path_factory):
    """Two regions with disjoint vocabularies, streamed one after the other (no labels)."""
    root = tmp_path_factory.mktemp("two")
    rng = random.Random(0)
    regions = {"1-words.txt": "river lamp ledger valley keeper window rain stone".split(),
               "2-digits.txt": "0 1 2 3 4 5 6 7 8 9 + - * = ( )".split()}  # fmt: skip
    for name, words in regions.items():
        docs = [" ".join(rng.choice(words) for _ in range(60)) for _ in range(100)]
        (root / name).write_text("\n\x1e\n".join(docs))
    return root


def make_cfg(root, model_dir, run, strategy, *extra):
    return build_config(None, [*strategy_overrides(strategy), f"model.name_or_path={model_dir}", f"run_dir={run}",
                               f"stream.sources=[{root / '1-words.txt'},{root / '2-digits.txt'}]",
                               "stream.seq_len=32", "train.batch_size=8", "train.lr=0.01",
                               f"replay.general_sources=[{root / '1-words.txt'}]", "replay.general_windows=64",
                               "checkpoint.every_steps=10", *extra])  # fmt: skip


@pytest.mark.parametrize(
    "strategy", [n for n, s in STRATEGIES.items() if not s.missing and n != "naive"]
)
def test_every_strategy_runs_and_detects_the_shift(strategy, two_regions, tiny_model_dir, tmp_path):
    with Learner(
        make_cfg(two_regions, tiny_model_dir, tmp_path / "run", strategy), show_progress=False
    ) as learner:
        summary = learner.run()
    cfg = learner.cfg
    assert summary.steps > 50
    if cfg.shift.detect:
        assert summary.shifts == 1  # one boundary, one event
        units = unit_table(read_ledger(tmp_path / "run"))
        assert [u["status"] for u in units] == ["closed", "open"]
        assert units[1]["opened_by"]["direction"] == "up"
    if cfg.protect.regularizers:
        assert summary.consolidations >= 1
        if not cfg.expand.grow:  # a grown adapter has nothing to protect until it is reused
            assert learner.s.protection.last_terms, "the penalty never entered the loss"
    if cfg.protect.reptile_every:
        assert summary.reptile_steps == summary.steps // cfg.protect.reptile_every
    if cfg.replay.general_ratio:
        assert summary.general_replayed == summary.steps * cfg.general_per_batch


def test_resume_with_protection_state_is_exact(two_regions, tiny_model_dir, tmp_path):
    """`her` with self-rehearsal on (the tiny model has no chat template, so `always`): the
    resumed run replays the answers the first start generated and ends bit-for-bit the same."""
    asks = tmp_path / "asks.txt"
    asks.write_text("Say hi.\nName a river.\nWhat is a lamp?\n")
    rehearse = ["replay.rehearsal=always", f"replay.rehearsal_prompts={asks}",
                "replay.rehearsal_tokens=8", "replay.rehearsal_ratio=0.25"]  # fmt: skip
    with Learner(
        make_cfg(two_regions, tiny_model_dir, tmp_path / "ref", "her", *rehearse),
        show_progress=False,
    ) as ref:
        ref.run()
        expected = adapter_state(ref.s.model)
        assert len(ref.s.rehearsal.pool) == 3
        assert ref.summary().rehearsed == 2 * ref.summary().steps  # 25% of a batch of 8
    stop = tmp_path / "stopped"
    with Learner(
        make_cfg(two_regions, tiny_model_dir, stop, "her", "train.max_steps=75", *rehearse),
        show_progress=False,
    ) as a:
        first = a.run()
    assert (stop / "rehearsal.json").read_text() == (
        tmp_path / "ref" / "rehearsal.json"
    ).read_text()
    assert (
        first.shifts == 1
    )  # the stop comes after the shift: detector, ledger and penalties resume
    with Learner(
        make_cfg(two_regions, tiny_model_dir, stop, "her", *rehearse),
        resume=True,
        show_progress=False,
    ) as b:
        second = b.run()
        got = adapter_state(b.s.model)
    assert second.shifts == 1 and second.steps == ref.summary().steps
    for name, w in expected.items():
        assert torch.allclose(got[name], w, atol=1e-6, rtol=0), name
    assert [r["type"] for r in read_ledger(stop)] == [
        r["type"] for r in read_ledger(tmp_path / "ref")
    ]


def test_rollback_restores_weights_bit_exactly(two_regions, tiny_model_dir, tmp_path, capsys):
    run = tmp_path / "run"
    with Learner(make_cfg(two_regions, tiny_model_dir, run, "ewc"), show_progress=False) as learner:
        learner.run()
        after = adapter_state(learner.s.model)
    snapshot = load_file(
        str(run / "units" / "unit-0001" / "adapters" / "default" / "adapter_model.safetensors")
    )
    assert any(
        not torch.equal(snapshot[k], after[k]) for k in snapshot
    )  # training went on after the unit
    assert main(["ledger", str(run)]) == 0
    assert "unit-0001" in capsys.readouterr().out
    assert main(["rollback", str(run), "--to", "unit-0001"]) == 0
    with Learner(learner.cfg, resume=True, show_progress=False) as resumed:
        restored = adapter_state(resumed.s.model)
    assert restored.keys() == snapshot.keys()
    for k in snapshot:
        assert torch.equal(restored[k], snapshot[k]), k  # bit-exact
    assert read_ledger(run)[-1]["type"] == "rollback"
    assert main(["rollback", str(run), "--to", "unit-0009"]) == 2
    assert "has not closed" in capsys.readouterr().err
