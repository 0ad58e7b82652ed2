"""Progressive expansion in the loop: grow on a new region, reuse on a recurring one, routed
outputs survive save/load exactly, resume is exact, `herllm generate` routes."""

import random

import pytest
import torch

from herllm.cli import main
from herllm.config import build_config
from herllm.infer.adapted import AdaptedModel
from herllm.memory.ledger import read_ledger
from herllm.run.adapters_io import adapter_state
from herllm.run.learner import Learner
from herllm.strategies import strategy_overrides

pytestmark = pytest.mark.slow

WORDS = "river lamp ledger valley keeper window rain stone".split()
DIGITS = "0 1 2 3 4 5 6 7 8 9 + - * = ( )".split()


@pytest.fixture(scope="module")
def regions(tmp_path_factory):
    """Words, then digits, then words again (no labels, no boundaries)."""
    root = tmp_path_factory.mktemp("regions")
    rng = random.Random(0)
    for name, vocab in (("1-words.txt", WORDS), ("2-digits.txt", DIGITS), ("3-words.txt", WORDS)):
        docs = [" ".join(rng.choice(vocab) for _ in range(60)) for _ in range(100)]
        (root / name).write_text("\n\x1e\n".join(docs))
    return root


def make_cfg(root, model_dir, run, strategy="olora", *extra):
    files = ",".join(str(root / n) for n in ("1-words.txt", "2-digits.txt", "3-words.txt"))
    return build_config(None, [*strategy_overrides(strategy), f"model.name_or_path={model_dir}",
                               f"run_dir={run}", f"stream.sources=[{files}]", "stream.seq_len=32",
                               "train.batch_size=8", "train.lr=0.01", "checkpoint.every_steps=10",
                               f"replay.general_sources=[{root / '1-words.txt'}]",
                               "replay.general_windows=64", *extra])  # fmt: skip


def adapter_actions(run) -> list[tuple[str, str]]:
    return [(r["action"], r["adapter"]) for r in read_ledger(run) if r["type"] == "adapter"]


STEP_SCORES = ("select.scores=step", "select.policy=all", "shift.reps=embed")


@pytest.mark.parametrize(("strategy", "extra"), [("olora", ()), ("her", ()), ("her", STEP_SCORES)])
def test_a_new_region_grows_one_adapter_and_a_recurring_one_reuses_it(
    strategy, extra, regions, tiny_model_dir, tmp_path
):
    """Also with the scores taken from the training step (`select.scores=step`): detection
    then sees each window one step later, and finds the same regions on the input embeddings
    (`shift.reps=embed`; the adapted model's own representations drift as it learns, and on
    this stream raise a false shift inside the digits)."""
    run = tmp_path / "run"
    cfg = make_cfg(regions, tiny_model_dir, run, strategy, *extra)
    with Learner(cfg, show_progress=False) as learner:
        summary = learner.run()
        bank = learner.s.bank
        terms = learner.s.protection.last_terms
    if strategy == "her":  # MAS protects the reused adapter against its anchor of unit-0001
        assert "mas" in terms and terms["mas"] > 0
    assert summary.shifts == 2
    assert adapter_actions(run) == [("grow", "a001"), ("reuse", "default")]
    assert list(bank.adapters) == ["default", "a001"] and bank.current == "default"
    assert bank.adapters["default"]["units"] == ["unit-0001"]
    assert bank.adapters["a001"]["units"] == ["unit-0002"]
    saved = sorted(p.name for p in (run / "units" / "unit-0002" / "adapters").iterdir())
    assert saved == ["a001", "default", "routing.json"]  # PEFT folder per adapter + routing keys


def test_routed_outputs_survive_save_and_load_exactly(regions, tiny_model_dir, tmp_path, capsys):
    run = tmp_path / "run"
    with Learner(make_cfg(regions, tiny_model_dir, run, "her"), show_progress=False) as learner:
        learner.run()
        tok = learner.s.tokenizer
        texts = [
            " ".join(WORDS[:6]),
            " ".join(DIGITS[:10]),
            " ".join(WORDS[2:]),
            " ".join(DIGITS[6:] + DIGITS[:6]),
        ]
        enc = tok(texts, return_tensors="pt", padding=True)
        live = learner.s.inference_model()
        live.eval()
        expected = live(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
        live_routes = list(live.last_routes)
    assert live_routes == ["default", "a001", "default", "a001"]
    loaded = AdaptedModel.from_run(run)
    routed = loaded.routed()
    got = routed(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    assert routed.last_routes == live_routes
    assert torch.equal(got, expected)
    assert loaded.routes(texts[:2]) == ["default", "a001"]
    forced = loaded.routed("a001")(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    assert torch.allclose(forced.logits[1], expected[1]) and not torch.allclose(
        forced.logits[0], expected[0]
    )
    # the CLI: routed generation, a forced adapter, and a one-line error for an unknown one
    assert main(["generate", "--run", str(run), "--max-new-tokens", "4", texts[1]]) == 0
    assert capsys.readouterr().out.startswith("[a001] ")
    assert (
        main(
            ["generate", "--run", str(run), "--adapter", "unit-0001", "--max-new-tokens", "2", "x"]
        )
        == 0
    )
    assert capsys.readouterr().out.startswith("[unit-0001] ")
    assert main(["generate", "--run", str(run), "--adapter", "nope", "x"]) == 2
    err = capsys.readouterr().err
    assert "unknown adapter 'nope'" in err and len(err.strip().splitlines()) == 1


def test_resume_after_growth_is_exact(regions, tiny_model_dir, tmp_path):
    with Learner(make_cfg(regions, tiny_model_dir, tmp_path / "ref"), show_progress=False) as ref:
        ref.run()
        expected = adapter_state(ref.s.model)
        steps = ref.s.step
    stop = tmp_path / "stopped"
    with Learner(
        make_cfg(regions, tiny_model_dir, stop, "olora", "train.max_steps=75"), show_progress=False
    ) as a:
        first = a.run()
    assert first.shifts == 1 and list(a.s.bank.adapters) == [
        "default",
        "a001",
    ]  # stopped after growing
    events = (stop / "events.jsonl").read_text()
    # What a run killed after its last checkpoint leaves behind: the resumed run logs it again.
    with open(stop / "events.jsonl", "a") as fh:
        fh.write('{"event": "shift", "step": 76}\n')
    with Learner(make_cfg(regions, tiny_model_dir, stop), resume=True, show_progress=False) as b:
        second = b.run()
        got = adapter_state(b.s.model)
        assert list(b.s.bank.adapters) == ["default", "a001"]
    assert second.steps == steps and second.shifts == 2
    assert got.keys() == expected.keys()
    for name, w in expected.items():
        assert torch.allclose(got[name], w, atol=1e-6, rtol=0), name
    assert adapter_actions(stop) == adapter_actions(tmp_path / "ref")
    resumed = (stop / "events.jsonl").read_text()
    assert resumed.startswith(events) and '"step": 76}' not in resumed
    assert resumed == (tmp_path / "ref" / "events.jsonl").read_text()


def test_cap_merges_the_closest_adapters_and_records_it(regions, tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    extra = ("expand.max_adapters=2", "expand.reuse_radius=0.01")  # every shift wants a new adapter
    with Learner(
        make_cfg(regions, tiny_model_dir, run, "olora", *extra), show_progress=False
    ) as learner:
        learner.run()
        bank = learner.s.bank
    merges = [r for r in read_ledger(run) if r["type"] == "adapter" and r["action"] == "merge"]
    assert len(merges) == 1 and set(merges[0]["adapters"]) == {"default", "a001"}
    assert list(bank.adapters) == ["m001", "a002"]
    assert bank.adapters["m001"]["units"] == ["unit-0001", "unit-0002"]
    ranks = {n: c.r for n, c in learner.s.model.peft_config.items()}
    assert ranks["m001"] == 2 * ranks["a002"]  # `cat` stacks the ranks: exact, no compression
