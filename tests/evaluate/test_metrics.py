"""Golden tests for herllm.evaluate.metrics on hand-computed matrices.

Notation in comments is docs/metrics.md's, 1-indexed: R[t][i] is row t,
domain i, i.e. ``M[t, i - 1]`` in numpy.
"""

import math

import numpy as np
import pytest

from herllm.evaluate import metrics as m

# T = 3 score matrix (higher is better). Rows: base, after d1, after d2, after d3.
R3 = np.array(
    [
        [0.20, 0.30, 0.10],  # b = R[0]
        [0.80, 0.40, 0.20],  # after d1
        [0.85, 0.90, 0.50],  # after d2 (d1 improved further: backward transfer, then forgot)
        [0.50, 0.70, 0.90],  # after d3
    ]
)

# T = 3 loss matrix (NLL, lower is better).
L3 = np.array(
    [
        [4.0, 5.0, 6.0],
        [2.0, 4.5, 5.5],
        [1.8, 2.0, 5.0],
        [3.0, 2.2, 1.0],
    ]
)


def test_average_accuracy_t3() -> None:
    # AA = mean(R[3][1], R[3][2], R[3][3]) = (0.5 + 0.7 + 0.9) / 3 = 0.7
    assert m.average_accuracy(R3) == pytest.approx(0.7)


def test_bwt_t3_uses_diagonal_not_base_row() -> None:
    # BWT = 1/2 * ((R[3][1] - R[1][1]) + (R[3][2] - R[2][2]))
    #     = 1/2 * ((0.5 - 0.8) + (0.7 - 0.9)) = 1/2 * (-0.3 - 0.2) = -0.25
    assert m.backward_transfer(R3) == pytest.approx(-0.25)


def test_forgetting_t3_takes_max_over_earlier_rows() -> None:
    # i=1: max_{l in [1,2]} (R[l][1] - R[3][1]) = max(0.8 - 0.5, 0.85 - 0.5) = 0.35
    # i=2: max_{l in [2,2]} (R[l][2] - R[3][2]) = 0.9 - 0.7 = 0.2
    # forgetting = (0.35 + 0.2) / 2 = 0.275   (differs from -BWT = 0.25 because of the max)
    assert m.forgetting(R3) == pytest.approx(0.275)


def test_fwt_t3_uses_row_before_training() -> None:
    # FWT = 1/2 * ((R[1][2] - b[2]) + (R[2][3] - b[3])) = 1/2 * ((0.4 - 0.3) + (0.5 - 0.1)) = 0.25
    assert m.forward_transfer(R3) == pytest.approx(0.25)


def test_average_final_loss_and_perplexity_t3() -> None:
    # mean_i L[3][i] = (3.0 + 2.2 + 1.0) / 3 = 6.2 / 3
    assert m.average_final_loss(L3) == pytest.approx(6.2 / 3)
    # exp of the mean log-loss = exp(2.0667) = 7.899..., not the mean of perplexities
    # (e^3 + e^2.2 + e^1) / 3 = 10.61...
    assert m.average_perplexity(L3) == pytest.approx(math.exp(6.2 / 3))
    assert m.average_perplexity(L3) < np.exp(L3[-1]).mean() - 2.0


def test_plasticity_t3() -> None:
    # mean_i L[i][i] = (L[1][1] + L[2][2] + L[3][3]) / 3 = (2.0 + 2.0 + 1.0) / 3 = 5/3
    assert m.plasticity(L3) == pytest.approx(5 / 3)


def test_plasticity_ratio_vs_naive() -> None:
    # naive diagonal (1.0, 1.0, 0.5) -> plasticity 2.5/3; ratio = (5/3) / (2.5/3) = 2.0:
    # the strategy learns new domains worse than naive fine-tuning.
    naive = L3.copy()
    naive[[1, 2, 3], [0, 1, 2]] = [1.0, 1.0, 0.5]
    assert m.plasticity_ratio(L3, naive) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="same domains"):
        m.plasticity_ratio(L3, L3[:3, :2])


def test_forgetting_loss_form_t3() -> None:
    # i=1: L[3][1] - min(L[1][1], L[2][1]) = 3.0 - min(2.0, 1.8) = 1.2
    # i=2: L[3][2] - min(L[2][2])          = 2.2 - 2.0          = 0.2
    # forgetting = (1.2 + 0.2) / 2 = 0.7  (positive = forgot, same sign as the accuracy form)
    assert m.forgetting_loss(L3) == pytest.approx(0.7)
    assert m.forgetting(-L3) == pytest.approx(0.7)


def test_loss_form_sign_conventions_t3() -> None:
    # BWT on R = -L: 1/2 * ((-3.0 + 2.0) + (-2.2 + 2.0)) = 1/2 * (-1.0 - 0.2) = -0.6 (forgot)
    assert m.backward_transfer(-L3) == pytest.approx(-0.6)
    # FWT on R = -L: 1/2 * ((-4.5 + 5.0) + (-5.0 + 6.0)) = 0.75 (stream lowered unseen losses)
    assert m.forward_transfer(-L3) == pytest.approx(0.75)
    # Passing the loss matrix itself as a score flips both signs: that is the trap.
    assert m.backward_transfer(L3) == pytest.approx(0.6)


def test_loss_matrix_summary_keys_and_values() -> None:
    s = m.loss_matrix_summary(L3)
    assert s["forgetting_loss"] == pytest.approx(0.7)
    assert s["bwt_neg_loss"] == pytest.approx(-0.6)
    assert s["fwt_neg_loss"] == pytest.approx(0.75)
    assert s["plasticity"] == pytest.approx(5 / 3)
    assert s["avg_perplexity"] == pytest.approx(math.exp(6.2 / 3))


def test_t2_edge_case() -> None:
    r = np.array([[0.1, 0.2], [0.9, 0.3], [0.6, 0.8]])
    # AA = (0.6 + 0.8) / 2 = 0.7
    assert m.average_accuracy(r) == pytest.approx(0.7)
    # BWT = (R[2][1] - R[1][1]) / 1 = 0.6 - 0.9 = -0.3
    assert m.backward_transfer(r) == pytest.approx(-0.3)
    # forgetting = max_{l in [1,1]} (R[l][1] - R[2][1]) = 0.9 - 0.6 = 0.3
    assert m.forgetting(r) == pytest.approx(0.3)
    # FWT = R[1][2] - b[2] = 0.3 - 0.2 = 0.1
    assert m.forward_transfer(r) == pytest.approx(0.1)
    loss = np.array([[5.0, 6.0], [2.0, 5.5], [2.5, 1.5]])
    # plasticity = (L[1][1] + L[2][2]) / 2 = (2.0 + 1.5) / 2 = 1.75
    assert m.plasticity(loss) == pytest.approx(1.75)
    # forgetting (loss) = L[2][1] - L[1][1] = 0.5
    assert m.forgetting_loss(loss) == pytest.approx(0.5)


def test_t1_edge_case_undefined_metrics_are_nan() -> None:
    r = np.array([[0.2], [0.7]])
    loss = np.array([[3.0], [2.0]])
    assert m.average_accuracy(r) == pytest.approx(0.7)
    assert m.average_final_loss(loss) == pytest.approx(2.0)
    assert m.plasticity(loss) == pytest.approx(2.0)
    for value in (
        m.backward_transfer(r),
        m.forgetting(r),
        m.forward_transfer(r),
        m.forgetting_loss(loss),
    ):
        assert math.isnan(value)


def test_forgetting_is_not_clamped_and_ignores_rows_before_training() -> None:
    r = np.array(
        [
            [0.9, 0.9, 0.9],  # base scores higher than anything later: must not enter the max
            [0.5, 0.2, 0.1],
            [0.6, 0.4, 0.3],
            [0.7, 0.1, 0.8],
        ]
    )
    # i=1: max(R[1][1], R[2][1]) - R[3][1] = 0.6 - 0.7 = -0.1 (improved: negative, not 0)
    # i=2: R[2][2] - R[3][2] = 0.4 - 0.1 = 0.3
    # forgetting = (-0.1 + 0.3) / 2 = 0.1  (clamping would give 0.15, using row 0 would give 0.25)
    assert m.forgetting(r) == pytest.approx(0.1)
    assert m.forgetting_loss(-r) == pytest.approx(0.1)


@pytest.mark.parametrize("shape", [(3, 3), (2, 3), (4,), (1, 0), (2, 1, 1)])
def test_bad_matrix_shape_raises(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"\(T\+1, T\)"):
        m.backward_transfer(np.zeros(shape))


def test_general_ability_delta() -> None:
    # L[T][general] - L[0][general] = 3.4 - 3.0 = 0.4 (worse general ability)
    assert m.general_ability_delta([3.0, 3.1, 3.3, 3.4]) == pytest.approx(0.4)
    with pytest.raises(ValueError, match=r"\(T\+1,\)"):
        m.general_ability_delta([3.0])


# Per-step trace, T = 3, switches at steps 2 (d2 starts) and 4 (d3 starts).
STEPS = np.array([0, 1, 2, 3, 4, 5, 6])
TRACE = np.array(
    [
        [5.0, 5.0, 5.0],
        [3.0, 5.0, 5.0],
        [2.0, 5.0, 5.0],  # switch 0: before d2
        [2.8, 2.05, 5.0],
        [2.5, 2.0, 5.0],  # switch 1: before d3
        [3.0, 2.6, 3.0],
        [2.7, 2.2, 2.0],
    ]
)
SWITCHES = [2, 4]
TOKENS = np.array([0, 100, 200, 300, 450, 500, 650])
SECONDS = np.array([0.0, 1.0, 2.0, 4.0, 5.0, 7.0, 8.0])


def test_stability_gap_t3_golden() -> None:
    gap = m.stability_gap(STEPS, TRACE, SWITCHES)
    # switch at 2, segment steps 3..4: d1: max(2.8, 2.5) - 2.0 = 0.8
    #   (steps 5..6 belong to the next segment; including them would give 3.0 - 2.0 = 1.0)
    # switch at 4, segment steps 5..6: d1: max(3.0, 2.7) - 2.5 = 0.5; d2: max(2.6, 2.2) - 2.0 = 0.6
    expected = np.array([[0.8, np.nan, np.nan], [0.5, 0.6, np.nan]])
    np.testing.assert_allclose(gap.gaps, expected)
    np.testing.assert_allclose(gap.per_switch, [0.8, 0.55])
    # mean over all (switch, earlier domain) pairs: (0.8 + 0.5 + 0.6) / 3, not mean(per_switch)
    assert gap.mean == pytest.approx(1.9 / 3)


def test_stability_gap_t2_and_t1() -> None:
    steps = [0, 10, 20, 25, 30, 40]
    losses = [[5.0, 6.0], [3.0, 5.8], [2.0, 5.5], [2.3, 4.0], [2.4, 3.0], [2.6, 2.5]]
    # switch at 20: d1 max(2.3, 2.4, 2.6) - 2.0 = 0.6 (the last evaluation is in the segment)
    assert m.stability_gap(steps, losses, [20]).mean == pytest.approx(0.6)
    one = m.stability_gap([0, 5], [[3.0], [2.0]], [])
    assert one.gaps.shape == (0, 1) and math.isnan(one.mean)


def test_stability_gap_needs_eval_at_switch_and_after() -> None:
    with pytest.raises(ValueError, match="no evaluation at switch step 3"):
        m.stability_gap([0, 2, 4], [[1.0, 1.0]] * 3, [3])
    with pytest.raises(ValueError, match="no evaluation after switch step 4"):
        m.stability_gap([0, 2, 4], [[1.0, 1.0]] * 3, [4])
    with pytest.raises(ValueError, match="at most T-1"):
        m.stability_gap([0, 2, 4], [[1.0, 1.0]] * 3, [0, 2])


def test_adaptation_index_first_entry_into_band() -> None:
    # final 2.4, band [2.28, 2.52]: 1.9 overshoots (outside), 2.5 is the first inside -> index 2
    assert m.adaptation_index([5.0, 1.9, 2.5, 2.4]) == 2
    # already within 5% at the switch -> 0
    assert m.adaptation_index([2.05, 2.0]) == 0


def test_adaptation_speed_t3_golden() -> None:
    speed = m.adaptation_speed(STEPS, TRACE, SWITCHES, TOKENS, SECONDS)
    # d1, segment steps 0..2, final 2.0, band [1.9, 2.1]: first hit step 2 -> 200 - 0 tok, 2 - 0 s
    # d2, segment steps 2..4, final 2.0: 2.05 at step 3 is within -> 300 - 200 tok, 4 - 2 s
    # d3, segment steps 4..6, final 2.0: first hit step 6 -> 650 - 450 tok, 8 - 5 s
    np.testing.assert_allclose(speed.tokens, [200, 100, 200])
    np.testing.assert_allclose(speed.seconds, [2.0, 2.0, 3.0])


def test_adaptation_speed_untrained_domain_is_nan() -> None:
    # trace stops at the switch to d2: d2 has no segment yet
    speed = m.adaptation_speed(
        [0, 1, 2], [[3.0, 5.0], [2.0, 5.0], [2.0, 5.0]], [2], [0, 10, 20], [0, 1, 2]
    )
    assert speed.tokens[0] == 10 and math.isnan(speed.tokens[1])


def test_routing_confusion_and_accuracy() -> None:
    true = [0, 0, 0, 1, 1, 2]
    routed = [0, 1, 0, 1, 1, 0]
    conf = m.routing_confusion(true, routed, n_domains=3)
    np.testing.assert_array_equal(conf, [[2, 1, 0], [0, 2, 0], [1, 0, 0]])
    # diagonal 2 + 2 + 0 = 4 of 6 samples
    assert m.routing_accuracy(conf) == pytest.approx(4 / 6)
    np.testing.assert_allclose(m.routing_per_domain(conf), [2 / 3, 1.0, 0.0])


def test_routing_extra_adapters_and_empty_domain() -> None:
    # adapter 2 was grown for no known domain; domain 1 has no held-out sample
    conf = m.routing_confusion([0, 0, 0], [0, 2, 2], n_domains=2, n_routes=3)
    assert conf.shape == (2, 3)
    assert m.routing_accuracy(conf) == pytest.approx(1 / 3)
    per = m.routing_per_domain(conf)
    assert per[0] == pytest.approx(1 / 3) and math.isnan(per[1])
    with pytest.raises(ValueError, match="out of range"):
        m.routing_confusion([0, 3], [0, 0], n_domains=3)
