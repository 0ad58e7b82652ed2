"""`select.scores=step`: the scores of new windows come from the training step's own forward.

They equal a no-grad scoring pass's (the input-embedding representations too, which no
adapter moves), every window read is trained (or left out by `replay.mode=replace`),
remembered and accounted once with no scoring pass, and a run stopped and resumed ends where an
uninterrupted one does."""

import sqlite3

import pytest
import torch

from herllm.acquire.chunks import to_batch
from herllm.config import build_config
from herllm.refine.scoring import score_batch, step_scores
from herllm.run.adapters_io import adapter_state
from herllm.run.learner import Learner
from herllm.strategies import strategy_overrides

STEP = ("select.scores=step", "select.policy=all", "shift.reps=model")


def make_cfg(root, model_dir, run, *extra):
    text = "\n\x1e\n".join(
        f"note {i}: the keeper lights lamp {i % 7} and writes {i * 13} in the ledger."
        for i in range(80)
    )
    (root / "s.txt").write_text(text)
    return build_config(None, [*strategy_overrides("her"), f"model.name_or_path={model_dir}",
                               f"run_dir={root / run}", f"stream.sources=[{root / 's.txt'}]",
                               "stream.seq_len=32", "train.batch_size=8", "train.lr=0.01",
                               "replay.rehearsal=never", f"replay.general_sources=[{root / 's.txt'}]",
                               "replay.general_windows=16", "shift.warmup=8",
                               "checkpoint.every_steps=3", *extra])  # fmt: skip


def test_step_scores_equal_a_scoring_pass_with_the_same_weights(tmp_path, tiny_model_dir):
    with Learner(make_cfg(tmp_path, tiny_model_dir, "run", *STEP), show_progress=False) as lr:
        s = lr.s
        windows, _ = s.next_windows(6)
        batch = s.to_device(to_batch(windows))
        for p in s.trainable:  # adapters away from zero, so they change the scores
            p.data.add_(0.05 * torch.randn_like(p))
        before = score_batch(s.model, batch)
        s.model.train()
        out = s.model(**batch, output_hidden_states=True)
        got = step_scores(s.model, out, batch, 4)
        base = step_scores(s.model, out, batch, 4, reps="base", entropy=False)
    assert len(got) == 4 and got.tokens == 0
    torch.testing.assert_close(got.nll, before.nll[:4], atol=1e-5, rtol=0)
    torch.testing.assert_close(got.entropy, before.entropy[:4], atol=1e-5, rtol=0)
    torch.testing.assert_close(got.reps, before.reps[:4], atol=1e-5, rtol=0)
    assert base.base and torch.isnan(base.entropy).all()
    assert not torch.allclose(base.reps, got.reps, atol=1e-3)  # the adapters are off there


def test_embedding_reps_are_the_pooled_input_embeddings_whatever_the_adapters_learned(
    tmp_path, tiny_model_dir
):
    """`shift.reps=embed`: a training step and a scoring pass pool the same input embeddings,
    and moving the adapters moves the model's representations but not these."""
    cfg = make_cfg(tmp_path, tiny_model_dir, "run", *STEP[:2], "shift.reps=embed")
    with Learner(cfg, show_progress=False) as lr:
        s = lr.s
        windows, _ = s.next_windows(6)
        batch = s.to_device(to_batch(windows))
        mask = batch["attention_mask"].unsqueeze(-1).float()
        table = s.model.get_input_embeddings()(batch["input_ids"]).detach()
        expected = (table * mask).sum(1) / mask.sum(1)  # (6, H) mean over real tokens
        before = score_batch(s.model, batch, reps="embed")
        model_before = score_batch(s.model, batch).reps
        for p in s.trainable:
            p.data.add_(0.05 * torch.randn_like(p))
        s.model.train()
        out = s.model(**batch, output_hidden_states=True)
        after = step_scores(s.model, out, batch, 4, reps="embed")
        model_after = score_batch(s.model, batch).reps
    torch.testing.assert_close(before.reps, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(after.reps, expected[:4], atol=1e-6, rtol=0)
    assert not before.base and not after.base  # not valid as routing-key inputs
    assert not torch.allclose(model_before, model_after, atol=1e-3)  # these do move


@pytest.mark.parametrize("mode", ["add", "replace"])
def test_every_window_read_is_trained_remembered_and_counted_once(mode, tmp_path, tiny_model_dir):
    """The windows `replace` leaves out of the batch are scored by a pass only while the
    detector confirms a candidate shift, else go to the buffer unscored (at the mean loss of
    the windows trained beside them); the detector's sample index and the ledger's stay the
    same (units split at the detector's index)."""
    cfg = make_cfg(tmp_path, tiny_model_dir, "run", *STEP, f"replay.mode={mode}")
    with Learner(cfg, show_progress=False) as learner:
        summary = learner.run()
        ledger, detector = learner.s.ledger, learner.s.detector
    assert summary.windows_read > 40 and ledger.total == summary.windows_read
    assert summary.selected == summary.windows_read and summary.skipped_by_selection == 0
    assert summary.buffer_rows == summary.windows_read
    with sqlite3.connect(tmp_path / "run" / "replay.sqlite") as db:
        scores = [r[0] for r in db.execute("SELECT last_score FROM rows")]
    assert min(scores) > 0  # every row has a real score (a priority of 0 would never replay)
    assert (summary.replaced_by_replay > 0) == (mode == "replace")
    assert ledger.indexed == detector.n_seen
    unscored = summary.windows_read - detector.n_seen
    assert summary.tokens_scored == 32 * (summary.replaced_by_replay - unscored)  # full windows
    if mode == "add":  # no scoring pass at all
        assert summary.tokens_scored == 0 and unscored == 0
    else:  # some left-out windows scored (a candidate was open), most not
        assert 0 < summary.tokens_scored and unscored > summary.replaced_by_replay / 2


@pytest.mark.parametrize("mode", ["add", "replace"])
def test_a_stopped_and_resumed_run_ends_where_an_uninterrupted_one_does(
    mode, tmp_path, tiny_model_dir
):
    step = (*STEP, f"replay.mode={mode}")
    with Learner(make_cfg(tmp_path, tiny_model_dir, "ref", *step), show_progress=False) as ref:
        expected = ref.run()
        weights = adapter_state(ref.s.model)
        indexed = ref.s.ledger.indexed
    stop = make_cfg(tmp_path, tiny_model_dir, "cut", *step, "train.max_steps=7")
    with Learner(stop, show_progress=False) as first:
        first.run()
    with Learner(make_cfg(tmp_path, tiny_model_dir, "cut", *step), resume=True,
                 show_progress=False) as second:  # fmt: skip
        got = second.run()
        resumed = adapter_state(second.s.model)
        assert second.s.ledger.indexed == indexed
    for key in ("steps", "windows_read", "tokens_trained", "replayed", "buffer_rows", "shifts",
                "replaced_by_replay"):  # fmt: skip
        assert getattr(got, key) == getattr(expected, key), key
    for name, w in weights.items():
        torch.testing.assert_close(resumed[name], w, atol=1e-6, rtol=0)
