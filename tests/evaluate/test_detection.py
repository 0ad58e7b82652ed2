from herllm.evaluate.detection import match_events


def test_delays_misses_and_false_alarms_hand_computed():
    # domains start at 0, 100, 200, 300; 400 samples in all.
    # events: 50 (false alarm in domain 0), 130 (detects 100, delay 30), 150 (false alarm),
    #         (none in [200, 300): boundary 200 missed), 310 (detects 300, delay 10)
    r = match_events([100, 200, 300], [50, 130, 150, 310], 400)
    assert r["delays"] == [30, 10]
    assert r["misses"] == 1
    assert r["false_alarms_per_domain"] == [1, 1, 0, 0]
    assert r["false_alarms_per_10k"] == 1e4 * 2 / 400


def test_single_domain_has_only_false_alarms():
    r = match_events([], [5, 9], 10)
    assert r == {
        "delays": [],
        "misses": 0,
        "false_alarms_per_domain": [2],
        "false_alarms_per_10k": 2000.0,
    }
