"""Behaviour of the loop: it learns, its adapters are plain PEFT, bad steps are skipped."""

import math

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from herllm.config import build_config
from herllm.run.learner import Learner, NonFiniteLossError


def make_cfg(tmp_path, model_dir, *extra):
    text = "\n\x1e\n".join(
        f"note {i}: the keeper lights the lamp and writes the ledger." for i in range(60)
    )
    (tmp_path / "s.txt").write_text(text)
    return build_config(None, [f"model.name_or_path={model_dir}", f"run_dir={tmp_path / 'run'}",
                               f"stream.sources=[{tmp_path / 's.txt'}]", f"eval.files=[{tmp_path / 's.txt'}]",
                               "stream.seq_len=32", "train.batch_size=4", "train.lr=0.01",
                               "train.warmup_steps=1", *extra])  # fmt: skip


def test_nonfinite_gradient_is_skipped_even_without_clipping(tmp_path, tiny_model_dir):
    """A NaN gradient under a finite loss is caught before the step with train.grad_clip=0 too:
    it used to reach AdamW, whose moments then stayed NaN, so every later step was lost."""
    learner = Learner(make_cfg(tmp_path, tiny_model_dir, "train.grad_clip=0"), show_progress=False)
    first = learner.s.trainable[0]
    real_update, calls = learner.update, {"n": 0}

    def update(*args):
        calls["n"] += 1
        if calls["n"] != 3:
            return real_update(*args)
        hook = first.register_hook(lambda g: g * float("nan"))
        try:
            return real_update(*args)
        finally:
            hook.remove()

    learner.update = update
    summary = learner.run()
    assert summary.nonfinite_skipped == 1 and summary.steps > 10
    assert all(torch.isfinite(p).all() for p in learner.s.trainable)
    moments = [v for st in learner.s.optimizer.state.values() for v in st.values()]
    assert moments and all(torch.isfinite(v).all() for v in moments)
    name = next(iter(summary.eval_first))
    assert summary.eval_last[name] < summary.eval_first[name]


def test_learning_lowers_heldout_loss(tmp_path, tiny_model_dir):
    summary = Learner(make_cfg(tmp_path, tiny_model_dir), show_progress=False).run()
    name = next(iter(summary.eval_first))
    assert summary.steps > 10
    assert summary.eval_last[name] < summary.eval_first[name] - 0.3
    assert summary.tokens_trained > 0 and summary.buffer_rows == summary.windows_read


def test_checkpoint_adapters_load_with_plain_peft(tmp_path, tiny_model_dir):
    learner = Learner(make_cfg(tmp_path, tiny_model_dir, "train.max_steps=4"), show_progress=False)
    learner.run()
    adapter = tmp_path / "run" / "checkpoints" / "step-0000004" / "adapters" / "default"
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    loaded = PeftModel.from_pretrained(base, str(adapter)).eval()
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    learner.s.model.eval()
    with torch.no_grad():
        assert torch.allclose(
            loaded(input_ids=ids).logits, learner.s.model(input_ids=ids).logits, atol=1e-6
        )


def test_uncertain_selection_skips_but_remembers(tmp_path, tiny_model_dir):
    cfg = make_cfg(
        tmp_path,
        tiny_model_dir,
        "select.policy=uncertain",
        "select.fraction=0.3",
        "select.warmup=16",
    )
    summary = Learner(cfg, show_progress=False).run()
    assert summary.skipped_by_selection > 0
    read = summary.selected + summary.skipped_by_selection
    assert read == summary.windows_read
    assert 0.2 < summary.selected / read < 0.6  # warm-up selects all, then about 30%
    assert summary.buffer_rows == summary.windows_read  # skipped windows still enter the buffer


def test_priority_replay_refreshes_scores(tmp_path, tiny_model_dir):
    cfg = make_cfg(
        tmp_path, tiny_model_dir, "replay.policy=priority", "replay.ratio=0.5", "train.max_steps=6"
    )
    learner = Learner(cfg, show_progress=False)
    summary = learner.run()
    assert summary.replayed == 6 * 2
    assert learner.s.buffer.counters()["score_updates"] >= 10


def test_nonfinite_loss_is_skipped_then_stops(tmp_path, tiny_model_dir, monkeypatch):
    learner = Learner(
        make_cfg(tmp_path, tiny_model_dir, "train.max_nonfinite=3"), show_progress=False
    )
    model = learner.s.model
    real_forward = model.forward
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        out = real_forward(*args, **kwargs)
        if model.training and "labels" in kwargs:
            calls["n"] += 1
            if calls["n"] in (2,) or calls["n"] >= 5:
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(model, "forward", poisoned)
    with pytest.raises(NonFiniteLossError, match="3 consecutive non-finite losses"):
        learner.run()
    assert learner.s.counters["nonfinite_skipped"] == 4  # one isolated, then three in a row
    assert all(torch.isfinite(p).all() for p in learner.s.trainable)
    assert not math.isnan(learner.s.eval_first[next(iter(learner.s.eval_first))])


def test_replay_replace_mode_trains_as_many_tokens_as_plain_fine_tuning(tmp_path, tiny_model_dir):
    runs = {}
    for name, extra in {
        "naive": ("replay.ratio=0",),
        "add": ("replay.ratio=0.5",),
        "replace": ("replay.ratio=0.5", "replay.mode=replace"),
    }.items():
        (tmp_path / name).mkdir()
        cfg = make_cfg(tmp_path / name, tiny_model_dir, "eval.files=[]", *extra)
        runs[name] = Learner(cfg, show_progress=False).run()
    naive, add, replace = runs["naive"], runs["add"], runs["replace"]
    assert add.windows_read == replace.windows_read == naive.windows_read  # all read
    # add: half of each batch is replay, so twice the steps and about twice the tokens
    assert add.tokens_trained > 1.7 * naive.tokens_trained and add.replaced_by_replay == 0
    # replace: as many steps as naive, replay in place of new windows (counted, not lost)
    assert replace.steps == naive.steps and replace.replayed > 0
    assert abs(replace.tokens_trained - naive.tokens_trained) <= 32 * 2  # two windows at most
    # each replayed row replaced a new window, but in the last, short batch
    assert replace.replayed - 2 <= replace.replaced_by_replay <= replace.replayed
    assert replace.buffer_rows == replace.windows_read  # replaced windows stay in the buffer
