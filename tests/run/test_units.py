"""A unit close does no work twice: the routing key and the grow/reuse decision use the base
representations the scoring pass computed (no base pass of their own, the same key), and the
held-out loss of the batches the importance pass ran comes from that pass's forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import tiny_lora_llama

from herllm.config import build_config
from herllm.memory.ledger import OpenUnit
from herllm.refine import scoring
from herllm.refine.scoring import mean_nll
from herllm.refine.shift import ShiftEvent
from herllm.run.learner import Learner
from herllm.run.units import close_unit, nll_tap
from herllm.strategies import strategy_overrides
from herllm.update import adapters as ad
from herllm.update.regularizers import MAS


@pytest.fixture()
def scored(tiny_model_dir, text_corpus, tmp_path):
    """A `her` learner whose open unit has read and scored 48 windows (no training step)."""
    cfg = build_config(None, [*strategy_overrides("her"), f"model.name_or_path={tiny_model_dir}",
                              f"run_dir={tmp_path / 'run'}", f"stream.sources=[{text_corpus}]",
                              "stream.seq_len=16", "replay.general_ratio=0"])  # fmt: skip
    learner = Learner(cfg, show_progress=False)
    learner.start()
    s = learner.s
    for _ in range(3):
        windows, _ = s.next_windows(16)
        scores = learner.score(windows)
        assert scores.base and scores.reps is not None
        s.ledger.observe([(w.input_ids[: w.n_tokens], w.loss_mask[: w.n_tokens]) for w in windows],
                         np.ones(len(windows), dtype=bool), scores.reps, base=True)  # fmt: skip
    new, _ = s.next_windows(16)
    yield learner, new, learner.score(new)
    learner.close()


def count_base_passes(monkeypatch) -> list[int]:
    calls = [0]
    real = scoring.base_pooled_states

    def counted(model, batch):
        calls[0] += 1
        return real(model, batch)

    monkeypatch.setattr(ad, "base_pooled_states", counted)
    return calls


def event_at(index: int) -> ShiftEvent:
    return ShiftEvent(step=0, sample_index=index, change_index=index, confirmed_index=index + 16,
                      detector="nll:adwin", direction="up", score_shift=1.0, rep_distance=None,
                      rep_z=None)  # fmt: skip


def test_a_close_with_reps_from_scoring_runs_no_base_pass_and_fits_the_same_key(
    scored, monkeypatch
):
    learner, new, scores = scored
    s = learner.s
    unit = s.ledger.current
    assert len(unit.reservoir_reps) == len(unit.reservoir) == 48
    assert all(r is not None for r in unit.reservoir_reps)
    windows = list(unit.reservoir)
    calls = count_base_passes(monkeypatch)
    close_unit(s, event_at(48), new, scores.reps)
    assert calls[0] == 0  # neither the key nor the grow/reuse decision ran the base model
    key = s.bank.keys["unit-0001"]
    recomputed = ad.fit_unit_key(s.model, windows, "unit-0001", key.adapter, s.cfg.stream.seq_len,
                                 s.packer.pad_id, s.accelerator.device)  # fmt: skip
    assert calls[0] == 6  # 48 windows in batches of 8: what a close cost before
    np.testing.assert_allclose(key.center, recomputed.center, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(key.scale, recomputed.scale, rtol=1e-5, atol=1e-6)
    assert key.median == pytest.approx(recomputed.median, rel=1e-5)
    assert key.n == recomputed.n and key.tokens == recomputed.tokens


def test_windows_without_reps_are_computed_and_old_units_load_without_them(scored, monkeypatch):
    learner, new, scores = scored
    s = learner.s
    state = dict(vars(s.ledger.current))
    del state["reservoir_reps"]  # a unit saved before representations were kept
    s.ledger.current = OpenUnit(**state)
    assert s.ledger.current.reservoir_reps == [None] * 48
    calls = count_base_passes(monkeypatch)
    close_unit(s, event_at(48), new, None)  # no reps carried at all: both parts pay a pass
    assert calls[0] == 6 + 2  # the key's 48 windows, then the 16 new ones
    assert "unit-0001" in s.bank.keys


def lm_batches(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 64, (4, 12), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 9:] = 0
        out.append(
            {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
        )
    return out


def test_the_importance_pass_measures_the_held_out_loss_of_its_batches():
    model = tiny_lora_llama()
    with torch.no_grad():  # a trained adapter: B is not zero
        for m in ad.lora_layers(model):
            m.lora_B["default"].weight.normal_(0, 0.1)
    batches = lm_batches(4)
    reference = mean_nll(model, batches)
    with nll_tap(model, batches) as measured:
        MAS().consolidate(model, batches[:2])
        model.train()
        model(**{k: batches[2][k] for k in ("input_ids", "attention_mask")})  # dropout mode
        model.eval()
        with model.disable_adapter():  # another model
            model(**{k: batches[3][k] for k in ("input_ids", "attention_mask")})
    assert sorted(measured) == [0, 1]
    forwards = []
    handle = model.register_forward_hook(lambda *a: forwards.append(1))
    assert mean_nll(model, batches, known=measured) == reference  # bit for bit
    handle.remove()
    assert len(forwards) == 2  # only the batches the importance pass did not run
