"""ShiftDetector on synthetic score/representation streams with known change points."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from herllm.refine.shift import ShiftDetector, ShiftEvent

HIDDEN = 16
SCORE_MEAN, SCORE_SD = 3.0, 0.3  # per-sample mean NLL of the first region, and its noise


@dataclass
class Segment:
    """``n`` samples with score mean ``shift`` sd away from the first region, reps centred at
    ``center`` in every dimension (1.0 = one within-region sd per dimension, effect size 1)."""

    n: int
    shift: float = 0.0
    center: float = 0.0


def run(
    det: ShiftDetector,
    segments: list[Segment],
    seed: int,
    batch: int = 8,
    reps_every: int = 1,
    batch_effect: float = 0.0,
) -> list[ShiftEvent]:
    """Feed the stream batch by batch; ``batch_effect`` adds a shared per-batch offset (in sd)."""
    rng = np.random.default_rng(seed)
    events, step = [], 0
    for seg in segments:
        for start in range(0, seg.n, batch):
            b = min(batch, seg.n - start)
            noise = rng.standard_normal(b) + batch_effect * rng.standard_normal()
            scores = SCORE_MEAN + SCORE_SD * (seg.shift + noise)  # (b,)
            reps = torch.from_numpy(seg.center + rng.standard_normal((b, HIDDEN)))  # (b, H)
            event = det.update(scores, reps if step % reps_every == 0 else None, step)
            if event is not None:
                events.append(event)
            step += 1
    return events


# Stated detection delays (confirmed_index - change point), with the default settings: the
# score detectors flag a 1 sd shift after ~20-50 samples, then 64 flagged representations are
# gathered (8 batches of 8) before confirmation.
DELAY_LIMIT = {0.5: 300, 1.0: 150, 2.0: 120, 4.0: 100}


@pytest.mark.parametrize("magnitude", [0.5, 1.0, 2.0, 4.0])
@pytest.mark.parametrize("sign", [1, -1], ids=["up", "down"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_detects_up_and_down_shifts_within_stated_delay(magnitude, sign, seed):
    det = ShiftDetector()
    events = run(det, [Segment(1000), Segment(1500, sign * magnitude, 1.0)], seed)
    assert len(events) == 1  # one shift, one event (cool-down)
    event = events[0]
    assert event.direction == ("up" if sign > 0 else "down")
    assert 1000 <= event.confirmed_index <= 1000 + DELAY_LIMIT[magnitude]
    assert abs(event.change_index - 1000) <= (40 if magnitude >= 1 else 80)
    assert event.score_shift * sign > 0.5 * magnitude
    assert event.rep_z is not None and event.rep_z >= det.rep_z_threshold


@pytest.mark.parametrize("seed", [0, 1])
def test_stationary_stream_of_20k_samples_raises_no_false_alarm(seed):
    det = ShiftDetector()
    assert run(det, [Segment(20_000)], seed) == []
    assert det.n_seen == 20_000
    scores_only = ShiftDetector(confirm_with_reps=False)
    assert len(run(scores_only, [Segment(20_000)], seed)) <= 1  # stated: at most 1 per 20k


def test_correlated_batches_trip_scores_but_representations_reject_them():
    scores_only = ShiftDetector(confirm_with_reps=False)
    assert len(run(scores_only, [Segment(20_000)], 0, batch_effect=0.5)) > 0
    det = ShiftDetector()
    assert run(det, [Segment(20_000)], 0, batch_effect=0.5) == []
    assert det.n_rejected > 0


def test_cooldown_gives_one_event_per_shift_on_a_three_region_stream():
    det = ShiftDetector(cooldown=300)
    events = run(det, [Segment(1500), Segment(1500, 2.0, 1.0), Segment(1500, 0.0, -1.0)], 3)
    assert [e.direction for e in events] == ["up", "down"]
    assert all(abs(e.change_index - c) <= 40 for e, c in zip(events, (1500, 3000), strict=True))
    assert det.n_events == 2


def test_score_blip_with_unchanged_representations_is_rejected():
    blip = [Segment(1000), Segment(64, 3.0, 0.0), Segment(1000)]
    det = ShiftDetector()
    assert run(det, blip, 4) == []
    assert det.n_rejected >= 1
    # Control: the same blip with moved representations is a (short) region of its own.
    moved = [Segment(1000), Segment(64, 3.0, 1.5), Segment(1000)]
    assert len(run(ShiftDetector(), moved, 4)) >= 1


def test_learning_within_a_region_is_not_a_shift():
    """Loss falling by 3 sd as the model learns: candidates may open, none is confirmed."""
    det = ShiftDetector()
    trend = [Segment(1, -3.0 * i / 3000) for i in range(3000)]
    assert run(det, trend, 5, batch=1) == []
    assert det.n_rejected >= 1  # the score detectors did see the trend


def test_representations_every_fourth_batch_still_confirm():
    det = ShiftDetector()
    events = run(det, [Segment(1000), Segment(1500, 2.0, 1.0)], 6, reps_every=4)
    assert len(events) == 1
    assert 1000 <= events[0].confirmed_index <= 1000 + det.patience


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rep_channel_finds_a_region_whose_scores_do_not_move(seed):
    # Same difficulty, other inputs: the score detectors have nothing to see.
    segments = [Segment(1000), Segment(1000, 0.0, 1.0)]
    assert run(ShiftDetector(), segments, seed) == []
    det = ShiftDetector(rep_channel=True)
    events = run(det, segments, seed)
    assert len(events) == 1
    assert "rep:" in events[0].detector
    assert 1000 <= events[0].confirmed_index <= 1000 + 100
    assert abs(events[0].change_index - 1000) <= 8  # located on the representations


@pytest.mark.parametrize("seed", [0, 1])
def test_rep_channel_raises_no_false_alarm_in_20k_stationary_samples(seed):
    det = ShiftDetector(rep_channel=True)
    assert run(det, [Segment(20_000)], seed) == []


def test_rep_channel_needs_representations_on_every_batch():
    det = ShiftDetector(rep_channel=True)
    with pytest.raises(ValueError, match="rep_channel=True"):
        det.update(np.ones(8), None, 0)


@pytest.mark.parametrize("rep_channel", [False, True])
def test_state_round_trip_continues_identically(rep_channel):
    det = ShiftDetector(rep_channel=rep_channel)
    # Checkpoint while a candidate waits for confirmation, then continue both.
    run(det, [Segment(900), Segment(40, -2.0, 1.0)], seed=8)
    state = det.state_dict()
    assert state["pending"] is not None
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    fresh = ShiftDetector(rep_channel=rep_channel)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    rest = [Segment(1000, -2.0, 1.0), Segment(1000, 0.0, 0.0)]
    events = run(det, rest, seed=9)
    assert run(fresh, rest, seed=9) == events
    assert len(events) == 2 and abs(events[0].change_index - 900) <= 20
    ours, theirs = fresh.state_dict()["seen"], det.state_dict()["seen"]
    assert len(ours) == len(theirs) > 0
    assert all(x == y and torch.equal(r, q) for (x, r), (y, q) in zip(ours, theirs, strict=True))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_next_unit_starts_at_the_change_point_and_is_ready_at_once(seed):
    # Regions of 150 samples: a unit that warmed up again after each confirmation (and cooled
    # down from it) would be blind when the next region starts.
    det = ShiftDetector(warmup=64, cooldown=120)
    segments = [
        Segment(1000),
        Segment(150, 2.0, 1.0),
        Segment(150, 0.0, 3.0),
        Segment(300, 2.0, 5.0),
    ]
    events = run(det, segments, seed)
    starts = (1000, 1150, 1300)
    assert len(events) == 3
    for event, start in zip(events, starts, strict=True):
        assert abs(event.change_index - start) <= 40
        assert 0 <= event.confirmed_index - start <= 110


def test_multiple_score_channels_and_bad_input():
    det = ShiftDetector(channels=("nll", "entropy"))
    rng = np.random.default_rng(0)
    for step in range(300):
        region = 0.0 if step < 150 else 1.0
        scores = np.stack([3 + 0.3 * rng.standard_normal(8), 2 + 0.2 * rng.standard_normal(8)], 1)
        scores[:, 1] += 0.4 * region  # only the entropy channel moves
        event = det.update(scores, torch.from_numpy(region + rng.standard_normal((8, 4))), step)
        if event is not None:
            assert "entropy:" in event.detector
            break
    else:
        pytest.fail("a shift in the second channel was not detected")
    with pytest.raises(ValueError, match="channels"):
        det.update([1.0, 2.0], None, 0)
    with pytest.raises(ValueError, match="non-finite"):
        det.update(np.full((2, 2), np.nan), None, 0)
    with pytest.raises(ValueError, match="reps"):
        det.update(np.ones((2, 2)), torch.zeros(3, 4), 0)
