"""The stability signals that adapt the penalty strength."""

from herllm.update.protection import StabilityTracker


def test_units_loss_is_the_forgetting_signal_when_available():
    t = StabilityTracker(decay=0.0)  # no smoothing: the EMA is the last value
    t.update(new_loss=3.0, replay_loss=2.0)
    assert t.signals(units_loss=1.5) == (0.0, 0.0)  # first call: nothing to compare with
    t.update(new_loss=2.5, replay_loss=1.0)  # replay got easier, but earlier units got worse:
    old_delta, progress = t.signals(units_loss=1.9)
    assert abs(old_delta - 0.4) < 1e-9 and abs(progress - 0.5) < 1e-9


def test_replay_loss_stands_in_without_closed_units():
    t = StabilityTracker(decay=0.0)
    t.update(new_loss=3.0, replay_loss=2.0)
    t.signals()
    t.update(new_loss=3.2, replay_loss=2.3)
    old_delta, progress = t.signals()
    assert abs(old_delta - 0.3) < 1e-9 and abs(progress + 0.2) < 1e-9  # forgetting, no progress
