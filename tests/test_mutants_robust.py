"""Every robust aggregation rule of methods/robust.py on hand-made cases whose results are worked out
by hand in the comments (mutation testing: benchmarks/mutants.py, section ``strategies_rules``).

Each delta has two tensors, so "over all tensors" (Krum's distances, norm_bound's norm) is pinned too.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from fedsqueeze.methods import robust
from fedsqueeze.methods.robust import (
    SCALAR_RULES,
    TENSOR_RULES,
    RobustRule,
    cap_flips,
    krum_scores,
    pairwise_sq_distances,
    trim_count,
    trimmed_mean_of,
    trimmed_votes,
)


def _d(a: list[float], b: list[float]) -> dict[str, np.ndarray]:
    return {"a": np.array(a, dtype=np.float32), "b": np.array(b, dtype=np.float32)}


def _line(values: list[float]) -> list[dict[str, np.ndarray]]:
    """Deltas on a line: tensor a holds the value, tensor b is zero (distances are squared differences)."""
    return [_d([v], [0.0]) for v in values]


def _check(got: dict[str, np.ndarray], expected: dict[str, list[float]]) -> None:
    assert set(got) == set(expected)
    for name, values in expected.items():
        assert got[name].dtype == np.float32, name
        np.testing.assert_allclose(got[name], np.array(values, dtype=np.float64), rtol=1e-6, atol=0, err_msg=name)


def test_the_rules_are_found_by_name_and_the_defaults_are_the_documented_ones():
    assert set(TENSOR_RULES) == {"mean", "median", "trimmed_mean", "krum", "multi_krum", "centered_clip"}
    assert set(SCALAR_RULES) == {"mean", "median", "trimmed_mean", "multi_krum"}
    rule = RobustRule()
    assert (rule.rule, rule.beta, rule.f, rule.m, rule.norm_bound, rule.tau, rule.iters) == ("mean", 0.1, 1, 0, 0.0, 0.0, 3)


def test_mean_is_example_weighted_over_every_tensor():
    deltas = [_d([1, 2], [0, 0, 4]), _d([3, 6], [3, 0, 0])]
    combined, metrics = RobustRule("mean").combine(deltas, [1, 3])
    # a: (1·1 + 3·3)/4 = 2.5, (2 + 18)/4 = 5; b: (0 + 9)/4 = 2.25, 0, 4/4 = 1
    _check(combined, {"a": [2.5, 5.0], "b": [2.25, 0.0, 1.0]})
    assert metrics == {}


def test_mean_of_huge_deltas_stays_finite():
    big = np.float32(3e38)
    combined, _ = RobustRule("mean").combine([_d([big], [0]), _d([big], [0])], [1, 1])
    assert combined["a"][0] == big  # summed in float64: a float32 sum would be inf


def test_median_is_per_coordinate_unweighted_and_averages_the_middle_pair():
    odd = [_d([1, 10], [0]), _d([5, 0], [2]), _d([3, 7], [1])]
    combined, metrics = RobustRule("median").combine(odd, [100, 1, 1])
    _check(combined, {"a": [3, 7], "b": [1]})
    assert metrics == {}
    even = [*odd, _d([100, -1], [9])]
    combined, _ = RobustRule("median").combine(even, [1, 1, 1, 1])
    # a[0]: 1 3 5 100 -> (3 + 5)/2; a[1]: -1 0 7 10 -> (0 + 7)/2; b: 0 1 2 9 -> 1.5
    _check(combined, {"a": [4, 3.5], "b": [1.5]})


@pytest.mark.parametrize(
    ("k", "beta", "expected"),
    [
        (10, 0.1, 1),
        (10, 0.25, 2),  # floor(2.5)
        (19, 0.1, 1),  # floor(1.9), not round
        (20, 0.1, 2),
        (7, 0.15, 1),
        (10, 0.0, 0),
        (10, 0.5, 4),  # floor(5) would leave nothing: (10 - 1) // 2 = 4
        (5, 0.5, 2),
        (4, 0.5, 1),
        (3, 0.4, 1),
        (2, 0.5, 0),
        (1, 0.9, 0),
    ],
)
def test_trim_count(k, beta, expected):
    assert trim_count(k, beta) == expected


def test_trimmed_mean_trims_exactly_t_from_each_end_unweighted():
    # k = 5, beta = 0.2: t = 1 per end
    deltas = [_d([1, -50], [1]), _d([1, 2], [1]), _d([1, 3], [1]), _d([9, 4], [9]), _d([9, 100], [9])]
    combined, metrics = RobustRule("trimmed_mean", beta=0.2).combine(deltas, [1, 1, 1, 1, 1000])
    # a[0]: 1 1 1 9 9 -> 1 1 9 -> 11/3; a[1]: -50 2 3 4 100 -> 2 3 4 -> 3; b: 1 1 1 9 9 -> 11/3
    _check(combined, {"a": [11 / 3, 3.0], "b": [11 / 3]})
    assert metrics == {"trimmed_each_end": 1.0}
    # beta = 0.4: t = 2 per end, the median of five
    combined, metrics = RobustRule("trimmed_mean", beta=0.4).combine(deltas, [1] * 5)
    _check(combined, {"a": [1.0, 3.0], "b": [1.0]})
    assert metrics == {"trimmed_each_end": 2.0}
    # beta = 0.1: t = floor(0.5) = 0, the plain unweighted mean
    combined, metrics = RobustRule("trimmed_mean", beta=0.1).combine(deltas, [1, 1, 1, 1, 1000])
    _check(combined, {"a": [21 / 5, 59 / 5], "b": [21 / 5]})
    assert metrics == {"trimmed_each_end": 0.0}


def test_trimmed_mean_of_sums_in_float64():
    big = np.float32(3e38)
    values = np.array([[big], [big], [big], [-big], [big]], dtype=np.float32)
    out = trimmed_mean_of(values, 0.2)  # drops -big and one big: the mean of three bigs
    assert out.dtype == np.float64 and out[0] == pytest.approx(float(big), rel=1e-7)


def test_pairwise_squared_distances_over_every_tensor():
    deltas = [_d([0, 0], [0]), _d([1, 0], [2]), _d([0, 3], [-1])]
    # d01 = 1 + 4 = 5; d02 = 9 + 1 = 10; d12 = 1 + 9 + 9 = 19
    expected = np.array([[0, 5, 10], [5, 0, 19], [10, 19, 0]], dtype=np.float64)
    got = pairwise_sq_distances(deltas)
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, expected)


def test_pairwise_squared_distances_add_up_every_chunk(monkeypatch):
    monkeypatch.setattr(robust, "CHUNK", 2)  # five values: chunks [0:2], [2:4], [4:5]
    x = {"a": np.array([1, 0, 0, 2, 3], dtype=np.float32), "b": np.array([0], dtype=np.float32)}
    y = {"a": np.zeros(5, dtype=np.float32), "b": np.array([4], dtype=np.float32)}
    # 1 + 4 + 9 (tensor a, every chunk) + 16 (tensor b)
    np.testing.assert_array_equal(pairwise_sq_distances([x, y]), [[0, 30], [30, 0]])


def test_pairwise_squared_distances_of_matrices_and_of_huge_deltas(monkeypatch):
    monkeypatch.setattr(robust, "CHUNK", 2)  # a 2 x 3 tensor is six values: chunks of the flattened tensor
    x = {"m": np.array([[1, 0, 0], [0, 0, 2]], dtype=np.float32)}
    y = {"m": np.zeros((2, 3), dtype=np.float32)}
    np.testing.assert_array_equal(pairwise_sq_distances([x, y]), [[0, 5], [5, 0]])
    big = [{"m": np.array([0.0], dtype=np.float32)}, {"m": np.array([1e20], dtype=np.float32)}]
    dist = pairwise_sq_distances(big)  # (1e20)^2 = 1e40: beyond float32, fine in float64
    assert np.isfinite(dist).all() and dist[0, 1] == pytest.approx(float(np.float32(1e20)) ** 2, rel=1e-12)


def test_krum_scores_sum_the_k_minus_f_minus_2_nearest():
    # k = 5, f = 1: the 2 nearest. Values 0 1 2 10 11:
    # 0: 1 4 | 100 121 -> 5; 1: 1 1 | 81 100 -> 2; 2: 1 4 | 64 81 -> 5; 10: 1 64 -> 65; 11: 1 81 -> 82
    np.testing.assert_array_equal(krum_scores(_line([0, 1, 2, 10, 11]), 1), [5, 2, 5, 65, 82])
    # k = 4, f = 0: the 2 nearest. Values 0 1 3 7: 0: 1+9; 1: 1+4; 3: 4+9; 7: 16+36
    np.testing.assert_array_equal(krum_scores(_line([0, 1, 3, 7]), 0), [10, 5, 13, 52])
    # k = 3, f = 1: k - f - 2 = 0, but at least 1. Values 0 1 5: 0: 1; 1: 1; 5: 16
    np.testing.assert_array_equal(krum_scores(_line([0, 1, 5]), 1), [1, 1, 16])
    # k = 5, f = 3: at least 1 -> the nearest one
    np.testing.assert_array_equal(krum_scores(_line([0, 1, 2, 10, 11]), 3), [1, 1, 1, 1, 1])
    # k = 2, f = 0: one other
    np.testing.assert_array_equal(krum_scores(_line([0, 3]), 0), [9, 9])
    # k = 1: no others, score 0
    np.testing.assert_array_equal(krum_scores(_line([4]), 0), [0])


def test_krum_picks_the_argmin_delta_itself():
    deltas = [_d([v], [2 * v]) for v in (0, 1, 2, 10, 11)]
    combined, metrics = RobustRule("krum", f=1).combine(deltas, [1, 5, 1, 1, 1])
    _check(combined, {"a": [1.0], "b": [2.0]})
    assert metrics == {"krum_selected": 1.0, "krum_first": 1.0}
    # a tie goes to the lower position. Values 0 2 10 11 (k = 4, f = 1: the 1 nearest, squared
    # distances x5 as b = 2a): 0: 20; 2: 20; 10: 5; 11: 5 -> position 2 (value 10), not 3
    combined, metrics = RobustRule("krum", f=1).combine([deltas[i] for i in (0, 2, 3, 4)], [1] * 4)
    assert metrics["krum_first"] == 2.0
    _check(combined, {"a": [10.0], "b": [20.0]})


def test_multi_krum_averages_the_m_best_by_examples():
    deltas = _line([0, 1, 2, 10, 11])  # scores 5 2 5 65 82 (f = 1)
    counts = [1, 3, 1, 5, 7]
    # m = 0: k - f = 4 -> positions 1, 0, 2, 3 (0 before 2: the stable order of equal scores)
    combined, metrics = RobustRule("multi_krum", f=1, m=0).combine(deltas, counts)
    _check(combined, {"a": [(0 * 1 + 1 * 3 + 2 * 1 + 10 * 5) / 10], "b": [0.0]})
    assert metrics == {"krum_selected": 4.0, "krum_first": 1.0}
    # m = 2 -> positions 1 and 0, by examples: 3/4
    combined, metrics = RobustRule("multi_krum", f=1, m=2).combine(deltas, counts)
    _check(combined, {"a": [0.75], "b": [0.0]})
    assert metrics == {"krum_selected": 2.0, "krum_first": 1.0}
    # m = 1: Krum's single choice
    combined, metrics = RobustRule("multi_krum", f=1, m=1).combine(deltas, counts)
    _check(combined, {"a": [1.0], "b": [0.0]})
    assert metrics == {"krum_selected": 1.0, "krum_first": 1.0}
    # m beyond k: all k
    _, metrics = RobustRule("multi_krum", f=1, m=9).combine(deltas, counts)
    assert metrics["krum_selected"] == 5.0
    # f >= k: k - f <= 0 -> at least one
    _, metrics = RobustRule("multi_krum", f=5, m=0).combine(deltas, counts)
    assert metrics["krum_selected"] == 1.0


def test_centered_clip_from_the_median_with_the_median_distance_as_radius():
    deltas = _line([0, 1, 4, 5, 20])
    # v0 = median 4; distances 4 3 0 1 16 -> tau = 3 (fixed from v0 on)
    # iteration 1: x - v = -4 -3 0 1 16 -> clipped -3 -3 0 1 3, sum -2 -> v = 4 - 2/5 = 3.6
    # iteration 2: x - v = -3.6 -2.6 0.4 1.4 16.4 -> -3 -2.6 0.4 1.4 3, sum -0.8 -> v = 3.6 - 0.16 = 3.44
    combined, metrics = RobustRule("centered_clip", iters=2).combine(deltas, [1, 1, 1, 1, 1000])
    _check(combined, {"a": [3.44], "b": [0.0]})
    assert metrics == {"cclip_tau": 3.0, "cclip_clipped": 2.0}
    # one iteration: 3.6; clipped: -4 and 16 (-3 is at tau, not over it)
    combined, metrics = RobustRule("centered_clip", iters=1).combine(deltas, [1] * 5)
    _check(combined, {"a": [3.6], "b": [0.0]})
    assert metrics == {"cclip_tau": 3.0, "cclip_clipped": 2.0}


def test_centered_clip_clips_over_every_tensor_with_a_given_radius():
    deltas = [_d([0], [0]), _d([0], [0]), _d([3], [4])]
    # v0 = (0, 0); the third is at distance 5 over both tensors: scaled by 2.5/5 to (1.5, 2); mean over k = 3
    combined, metrics = RobustRule("centered_clip", tau=2.5, iters=1).combine(deltas, [1, 1, 1])
    _check(combined, {"a": [0.5], "b": [2 / 3]})
    assert metrics == {"cclip_tau": 2.5, "cclip_clipped": 1.0}
    # a zero median distance (most deltas at the median) clips every move to nothing: v stays the median
    combined, metrics = RobustRule("centered_clip").combine(deltas, [1, 1, 1])
    _check(combined, {"a": [0.0], "b": [0.0]})
    assert metrics == {"cclip_tau": 0.0, "cclip_clipped": 1.0}


def test_centered_clip_per_coordinate_over_tensors_of_several_values():
    deltas = [_d([1, 5], [0]), _d([2, 6], [0]), _d([3, 7], [4])]
    # v0 = the median of each coordinate: a = (2, 6), b = 0 (over all six values of a it would be 4).
    # δ − v0: (−1, −1 | 0) at √2, 0 at 0, (1, 1 | 4) at √18 = 3√2 -> τ = median(√2, 0, 3√2) = √2.
    # scales 1 (at τ, not over it), 1 (at the centre), √2/(3√2) = 1/3: the sum (−1 + 1/3, −1 + 1/3 | 4/3),
    # divided by k = 3: v = (2 − 2/9, 6 − 2/9 | 4/9), one clipped
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the delta at the centre is not divided by its zero distance
        combined, metrics = RobustRule("centered_clip", iters=1).combine(deltas, [1, 1, 1])
    _check(combined, {"a": [16 / 9, 52 / 9], "b": [4 / 9]})
    assert metrics["cclip_tau"] == pytest.approx(2**0.5, rel=1e-15) and metrics["cclip_clipped"] == 1.0


def test_centered_clip_of_matrix_tensors_is_that_of_their_values():
    # the case above with tensor a as a 1 × 2 matrix: distances over every entry, the same result
    deltas = [{"a": np.array([[1, 5]], np.float32), "b": np.array([0], np.float32)}]
    deltas += [{"a": np.array([[2, 6]], np.float32), "b": np.array([0], np.float32)}]
    deltas += [{"a": np.array([[3, 7]], np.float32), "b": np.array([4], np.float32)}]
    combined, metrics = RobustRule("centered_clip", iters=1).combine(deltas, [1, 1, 1])
    assert combined["a"].shape == (1, 2)
    np.testing.assert_allclose(combined["a"], [[16 / 9, 52 / 9]], rtol=1e-6)
    np.testing.assert_allclose(combined["b"], [4 / 9], rtol=1e-6)
    assert metrics["cclip_clipped"] == 1.0


def test_centered_clip_with_a_given_radius_under_one():
    deltas = _line([0, 0.125, 0.5, 0.625, 2.0])
    # v0 = 0.5; δ − v0 = −0.5 −0.375 0 0.125 1.5, every distance but the last under 1; τ = 0.25 (the median
    # distance would be 0.375): clipped to −0.25 −0.25 0 0.125 0.25, sum −0.125 -> v = 0.5 − 0.125/5 = 0.475
    combined, metrics = RobustRule("centered_clip", tau=0.25, iters=1).combine(deltas, [1] * 5)
    _check(combined, {"a": [0.475], "b": [0.0]})
    assert metrics == {"cclip_tau": 0.25, "cclip_clipped": 3.0}


def test_centered_clip_with_no_iteration_is_the_median():
    combined, metrics = RobustRule("centered_clip", iters=0).combine(_line([0, 1, 4, 5, 20]), [1] * 5)
    _check(combined, {"a": [4.0], "b": [0.0]})
    assert metrics == {"cclip_tau": 3.0, "cclip_clipped": 0.0}


@pytest.mark.parametrize("name", sorted(TENSOR_RULES))
def test_every_rule_returns_a_lone_delta_itself(name):
    # a round where one client's update arrived: each rule's estimate is that update
    # (median and trimmed mean of one value; Krum with no other delta scores it 0; centered clipping: τ = 0)
    combined, _ = RobustRule(name).combine([_d([1, -5], [0.25])], [7])
    _check(combined, {"a": [1.0, -5.0], "b": [0.25]})


def test_norm_bound_scales_each_delta_by_its_norm_over_all_tensors_first():
    deltas = [_d([3], [4]), _d([6], [8]), _d([0], [0])]  # norms 5 (at the bound: kept), 10 (halved), 0
    combined, metrics = RobustRule("mean", norm_bound=5.0).combine(deltas, [1, 1, 2])
    # (3 + 3 + 0)/4, (4 + 4 + 0)/4
    _check(combined, {"a": [1.5], "b": [2.0]})
    assert metrics == {"norm_bounded": 1.0}
    # composed with another rule, whose metrics come along
    combined, metrics = RobustRule("trimmed_mean", beta=0.0, norm_bound=2.5).combine(deltas, [1, 1, 2])
    # every nonzero delta is scaled to norm 2.5: (1.5, 2) twice and zero; unweighted mean
    _check(combined, {"a": [1.0], "b": [4 / 3]})
    assert metrics == {"norm_bounded": 2.0, "trimmed_each_end": 0.0}
    # off by default: no clipping and no metric
    combined, metrics = RobustRule("mean").combine(deltas, [1, 1, 2])
    _check(combined, {"a": [9 / 4], "b": [12 / 4]})
    assert metrics == {}


def test_scalar_rules():
    stacked = np.array([[1, 0], [2, 10], [3, 20], [4, 30], [100, -1000]], dtype=np.float32)
    mean = SCALAR_RULES["mean"](stacked, 0.2, 1)
    assert mean.dtype == np.float64
    np.testing.assert_allclose(mean, [110 / 5, -940 / 5])
    np.testing.assert_array_equal(SCALAR_RULES["median"](stacked, 0.2, 1), [3, 10])
    trimmed = SCALAR_RULES["trimmed_mean"](stacked, 0.2, 1)  # t = 1: 2 3 4 and 0 10 20
    assert trimmed.dtype == np.float32
    np.testing.assert_allclose(trimmed, [3, 10])
    big = np.full((3, 1), 3e38, dtype=np.float32)
    assert np.isfinite(SCALAR_RULES["mean"](big, 0.0, 1)).all() and np.isfinite(SCALAR_RULES["trimmed_mean"](big, 0.0, 1)).all()


def test_scalar_multi_krum_scores_whole_blocks_and_averages_the_k_minus_f_best():
    stacked = np.array([[0, 0], [1, 0], [0, 2], [10, 10]], dtype=np.float32)
    # k = 4, f = 1: the 1 nearest. d01 = 1, d02 = 4, d03 = 200, d12 = 1 + 4 = 5, d13 = 81 + 100 = 181,
    # d23 = 100 + 64 = 164 -> scores 1 1 4 164; the k - f = 3 best are rows 0 1 2, unweighted
    got = SCALAR_RULES["multi_krum"](stacked, 0.2, 1)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, [1 / 3, 2 / 3], rtol=1e-6)
    # f = 2: the k - f - 2 = 0 nearest, at least 1 -> the same scores; rows 0 and 1
    np.testing.assert_allclose(SCALAR_RULES["multi_krum"](stacked, 0.2, 2), [0.5, 0.0])
    # f >= k: at least one row (the best-scored, the lower position on a tie)
    np.testing.assert_array_equal(SCALAR_RULES["multi_krum"](stacked, 0.0, 9), [0.0, 0.0])


def test_cap_flips_at_and_past_the_cap():
    ref = np.zeros(10, dtype=np.uint8)
    two = ref.copy()
    two[:2] = 1
    three = ref.copy()
    three[:3] = 1
    out, capped = cap_flips(two, ref, 0.2)  # 2 flips = 0.2 · 10: not more than the cap
    assert not capped and out is two
    out, capped = cap_flips(three, ref, 0.2)  # 3 > 2: no vote for any change
    assert capped and np.array_equal(out, ref) and out is not ref
    everything = np.ones(10, dtype=np.uint8)
    for cap in (0.0, -1.0):  # off
        out, capped = cap_flips(everything, ref, cap)
        assert not capped and out is everything


def test_trimmed_votes_is_the_trimmed_mean_times_k():
    votes = np.array([[1, 0, -1], [1, 0, -1], [1, 1, 0], [1, 1, 1], [0, 1, 1]], dtype=np.float32)
    # beta = 0.2, t = 1: column 0: 0 1 1 1 1 -> 1 1 1 -> 5·1; column 1: 0 0 1 1 1 -> 0 1 1 -> 5·2/3; column 2: -1 0 1 -> 0
    np.testing.assert_allclose(trimmed_votes(votes, 0.2), [5.0, 10 / 3, 0.0])
    # beta = 0: the plain vote sum
    np.testing.assert_allclose(trimmed_votes(votes, 0.0), [4.0, 3.0, 0.0])
