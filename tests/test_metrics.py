"""Metric functions against answers worked out by hand, and their properties under hypothesis."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import stats

from orchestrator import metrics

PREDS = np.array([[0, 1, 2, 3],
                  [0, 1, 2, 0],   # differs from row 0 at example 3
                  [1, 1, 2, 3]])  # differs from row 0 at 0, from row 1 at 0 and 3


def test_pairwise_disagreement_by_hand():
    expected = np.array([[0, 1 / 4, 1 / 4], [1 / 4, 0, 2 / 4], [1 / 4, 2 / 4, 0]])
    np.testing.assert_array_equal(metrics.pairwise_disagreement(PREDS), expected)


def test_churn_is_disagreement_not_agreement():
    assert metrics.churn(PREDS) == pytest.approx((1 / 4 + 1 / 4 + 2 / 4) / 3)
    assert metrics.churn(np.array([[0, 1, 2], [0, 1, 2]])) == 0.0
    assert metrics.churn(np.array([[0, 1, 2], [1, 2, 0]])) == 1.0


def test_churn_undefined_gives_nan():
    assert math.isnan(metrics.churn(np.array([[0, 1, 2]])))
    assert math.isnan(metrics.churn(np.zeros((3, 0), dtype=int)))


def test_sq_dists_by_hand_far_from_the_origin():
    # a 3-4-5 triangle moved to 1e6: the Gram trick on raw rows would lose it to cancellation
    x = np.array([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]]) + 1e6
    np.testing.assert_allclose(metrics.sq_dists(x), [[0, 9, 16], [9, 0, 25], [16, 25, 0]], rtol=0, atol=1e-9)


def test_sq_dists_equal_rows_exactly_zero_and_one_ulp_not():
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(4, 10_000)) * 1e3 + 1e4).astype(np.float32)
    x[2] = x[0]
    x[3] = x[1]
    x[3, 17] = np.nextafter(x[1, 17], np.float32(np.inf))
    d = metrics.sq_dists(x)
    assert d[0, 2] == 0.0 and d[2, 0] == 0.0
    assert d[1, 3] == (float(x[3, 17]) - float(x[1, 17])) ** 2 > 0
    direct = ((x[0].astype(np.float64) - x[1]) ** 2).sum()
    assert d[0, 1] == pytest.approx(direct, rel=1e-9)


def test_mean_over_pairs_ignores_the_diagonal():
    d = np.array([[7.0, 1.0, 2.0], [1.0, 7.0, 3.0], [2.0, 3.0, 7.0]])
    assert metrics.mean_over_pairs(d) == 2.0
    assert math.isnan(metrics.mean_over_pairs(np.zeros((1, 1))))


def test_std_ci_by_hand():
    # n=2, one degree of freedom: chi2(1).ppf(q) = norm.ppf((1 + q) / 2)²
    s = 1 / math.sqrt(2)
    lo, hi = metrics.std_ci([0.0, 1.0])
    assert lo == pytest.approx(s / stats.norm.ppf(0.9875)) and hi == pytest.approx(s / stats.norm.ppf(0.5125))
    # n=3, two degrees of freedom: chi2(2).ppf(q) = -2 ln(1 - q)
    lo, hi = metrics.std_ci([0.0, 1.0, 2.0], level=0.9)
    assert lo == pytest.approx(math.sqrt(2 / (-2 * math.log(0.05)))) and hi == pytest.approx(
        math.sqrt(2 / (-2 * math.log(0.95))))
    assert all(math.isnan(v) for v in metrics.std_ci([0.9]))


@pytest.mark.parametrize("n", [5, 10])
def test_std_ci_covers_the_true_std_95_percent_of_the_time(n):
    """2,000 samples of n normal accuracies: the 95% interval holds the true std 95% ± 2% of the
    time (the percentile bootstrap it replaced covered about 63% at n=5, 79% at n=10)."""
    samples = np.random.default_rng(n).normal(0.9, 0.01, size=(2000, n))
    covered = [lo <= 0.01 <= hi for lo, hi in map(metrics.std_ci, samples)]
    assert 0.93 <= np.mean(covered) <= 0.97


def test_per_example_std_by_hand():
    correct = np.array([[1, 1, 0, 1],
                        [1, 0, 0, 1],
                        [1, 1, 1, 1]])
    # columns 1 and 2 flip (ddof=1 variance 1/3 each), columns 0 and 3 never do: (2/3) / 4²
    assert metrics.per_example_std(correct) == pytest.approx(math.sqrt(1 / 24))
    assert metrics.per_example_std(correct.astype(bool)) == metrics.per_example_std(correct)
    assert metrics.per_example_std(np.tile(correct[:1], (5, 1))) == 0.0  # replicas agree everywhere
    assert math.isnan(metrics.per_example_std(correct[:1]))
    assert math.isnan(metrics.per_example_std(np.zeros((3, 0))))


def test_per_example_std_is_not_the_binomial_std():
    # every replica right on the same 90 of 100 examples: a binomial sqrt(p(1-p)/N) says 0.03
    correct = np.tile(np.arange(100) < 90, (5, 1))
    assert metrics.per_example_std(correct) == 0.0


def test_distribution_var_by_hand():
    correct = np.array([[1, 1, 0, 1], [1, 0, 0, 1], [1, 1, 1, 1]])
    # accuracies 3/4, 1/2, 1: variance 1/16; per-example part 1/24; remainder 1/48
    var, lo, hi = metrics.distribution_var(correct, level=0.9)
    assert var == pytest.approx(1 / 48)
    # chi-square interval of 1/16 with 2 degrees of freedom, shifted by 1/24
    assert lo == pytest.approx(2 / 16 / (-2 * math.log(0.05)) - 1 / 24)
    assert hi == pytest.approx(2 / 16 / (-2 * math.log(0.95)) - 1 / 24)
    assert metrics.distribution_var(np.tile(correct[:1], (4, 1))) == (0.0, 0.0, 0.0)
    # equal accuracies from different examples: the flips explain everything, the remainder is negative
    var, lo, hi = metrics.distribution_var(np.array([[1, 0], [0, 1]]))
    assert var == -0.25 and lo == hi == -0.25
    assert all(math.isnan(v) for v in metrics.distribution_var(correct[:1]))


@pytest.mark.parametrize("replicas", [5, 10])
def test_distribution_var_interval_covers_95_percent(replicas):
    """Runs that shift every example's correctness probability by a shared d ~ N(0, τ²), on top
    of independent per-example flips: the distribution-wise variance is τ²(1 - 1/N)."""
    rng = np.random.default_rng(replicas)
    n, tau = 400, 0.02
    q = rng.uniform(0.3, 0.7, n)
    hits = 0
    for _ in range(1000):
        correct = rng.random((replicas, n)) < q + rng.normal(0, tau, (replicas, 1))
        _, lo, hi = metrics.distribution_var(correct)
        hits += lo <= tau ** 2 * (1 - 1 / n) <= hi
    assert 0.93 <= hits / 1000 <= 0.97


def test_per_class_spread_by_hand():
    acc = np.array([[1.0, 0.5, 0.9], [1.0, 0.7, 0.9], [1.0, 0.9, 0.8]])
    std_max, std_mean, worst = metrics.per_class_spread(acc)
    assert std_max == pytest.approx(0.2)
    assert std_mean == pytest.approx((0 + 0.2 + np.std([0.9, 0.9, 0.8], ddof=1)) / 3)
    assert worst == 1
    assert metrics.per_class_spread(acc[:1])[2] is None
    assert metrics.per_class_spread(np.tile(acc[:1], (5, 1))) == (0.0, 0.0, None)


def test_std_of_equal_values_is_exactly_zero():
    # np.std(np.full(50, 0.8856), ddof=1) is 2.2e-16: the mean rounds
    assert metrics.sample_std(np.full(50, 0.8856)) == 0.0
    assert metrics.std_ci(np.full(50, 0.8856)) == (0.0, 0.0)


def test_binary_rates_by_hand():
    fpr, fnr = metrics.binary_rates(np.array([[1, 0, 1, 0], [0, 0, 1, 1]]), np.array([0, 0, 1, 1]))
    np.testing.assert_array_equal(fpr, [0.5, 0.0])
    np.testing.assert_array_equal(fnr, [0.5, 0.0])


def test_brown_forsythe():
    a, b = [0.90, 0.91, 0.89, 0.92], [0.80, 0.95, 0.70, 0.99]
    assert metrics.brown_forsythe_p(a, b) == pytest.approx(stats.levene(a, b, center="median").pvalue)
    assert metrics.brown_forsythe_p([0.9] * 4, [0.9] * 4) == 1.0
    assert metrics.brown_forsythe_p([0.9] * 5, [0.85, 0.9, 0.95, 0.8, 0.99]) < 0.05
    assert math.isnan(metrics.brown_forsythe_p([0.9], b))


def test_pitman_morgan_by_hand():
    a, b = np.array([0.90, 0.92, 0.88, 0.91, 0.89]), np.array([0.80, 0.97, 0.75, 0.95, 0.82])
    r = np.corrcoef(a + b, a - b)[0, 1]
    t = r * math.sqrt(3 / (1 - r * r))  # Pearson's t with n - 2 = 3 degrees of freedom
    assert metrics.pitman_morgan_p(a, b) == pytest.approx(2 * stats.t.sf(abs(t), 3))
    assert metrics.pitman_morgan_p([0.9] * 4, [0.9] * 4) == 1.0
    assert metrics.pitman_morgan_p(a, a + 0.01) == 1.0  # b = a + c: the same spread
    assert metrics.pitman_morgan_p([0.9] * 5, b) == 0.0  # a+b and a-b perfectly anti-correlated
    assert math.isnan(metrics.pitman_morgan_p(a[:2], b[:2]))
    with pytest.raises(ValueError, match="different lengths"):
        metrics.pitman_morgan_p(a, b[:4])


def test_pitman_morgan_sees_what_the_unpaired_test_misses():
    """Common random numbers: b is a plus a small extra spread. Paired, the extra variance shows;
    treated as independent groups it drowns in the shared seed-to-seed spread."""
    rng = np.random.default_rng(0)
    a = rng.normal(0.9, 0.01, 20)
    b = a + rng.normal(0, 0.004, 20) + 0.3 * (a - a.mean())
    assert metrics.pitman_morgan_p(a, b) < 0.01 < metrics.brown_forsythe_p(a, b)


def test_median_ratio_ci_by_hand():
    # det units medians: {u0,u0} -> 2, {u1,u1} -> 4, mixed -> 3; each end has probability 1/4
    det, nondet = [np.array([2.0, 2.0]), np.array([4.0, 4.0])], [np.ones(2), np.ones(2)]
    assert metrics.median_ratio_ci(det, nondet, seed=0) == pytest.approx((3.0, 2.0, 4.0))
    ratio, lo, hi = metrics.median_ratio_ci([np.array([3.0, 3.0, 3.0])], [np.ones(3)], seed=0)
    assert ratio == 3.0 and math.isnan(lo) and math.isnan(hi)


def test_median_ratio_ci_paired_resamples_pairs_together():
    # drift: pair k's det and nondet blocks both run at speed k, det always 2x nondet. Paired, every
    # resample keeps the 2x; unpaired, a slow det block meets a fast nondet block and the interval widens
    det = [np.full(3, 2.0 * k) for k in (1, 2, 3, 4)]
    nondet = [np.full(3, 1.0 * k) for k in (1, 2, 3, 4)]
    assert metrics.median_ratio_ci(det, nondet, seed=0, paired=True) == (2.0, 2.0, 2.0)
    _, lo, hi = metrics.median_ratio_ci(det, nondet, seed=0)
    assert lo < 1.5 and hi > 3.0
    assert all(math.isnan(v) for v in metrics.median_ratio_ci(det[:1], nondet[:1], seed=0, paired=True)[1:])
    with pytest.raises(ValueError, match="different counts"):
        metrics.median_ratio_ci(det, nondet[:3], seed=0, paired=True)


def test_median_ratio_ci_units_of_unequal_length():
    det = [np.array([1.0]), np.array([2.0, 2.0, 2.0]), np.array([3.0, 3.0])]
    ratio, lo, hi = metrics.median_ratio_ci(det, [np.ones(1), np.ones(4)], seed=3)
    assert ratio == 2.0 and 1.0 <= lo <= ratio <= hi <= 3.0


# --- properties -------------------------------------------------------------------------------

pred_rows = st.integers(1, 30).flatmap(
    lambda n: st.lists(hnp.arrays(np.int32, n, elements=st.integers(0, 3)), min_size=2, max_size=6))


@given(pred_rows)
def test_churn_properties(rows):
    preds = np.stack(rows)
    c = metrics.churn(preds)
    assert 0.0 <= c <= 1.0
    assert (c == 0.0) == all(np.array_equal(rows[0], r) for r in rows)
    assert c == metrics.churn(preds[::-1])  # the order of runs does not matter, bit for bit
    assert c == pytest.approx(metrics.mean_over_pairs(metrics.pairwise_disagreement(preds)), abs=1e-12)


@given(pred_rows)
def test_pairwise_disagreement_symmetric(rows):
    d = metrics.pairwise_disagreement(np.stack(rows))
    np.testing.assert_array_equal(d, d.T)
    assert ((d == 0) == np.array([[np.array_equal(a, b) for b in rows] for a in rows])).all()
    assert metrics.churn(np.stack(rows[:2])) == metrics.churn(np.stack(rows[1::-1])) == d[0, 1]


floats32 = st.floats(-1e6, 1e6, width=32, allow_subnormal=True)
weight_rows = st.integers(1, 40).flatmap(lambda n: st.tuples(
    st.lists(hnp.arrays(np.float32, n, elements=floats32), min_size=1, max_size=4),
    st.lists(st.integers(0, 3), min_size=2, max_size=6)))


@settings(max_examples=200)
@given(weight_rows)
def test_l2_zero_exactly_when_weights_equal(data):
    pool, pick = data
    x = np.stack([pool[i % len(pool)] for i in pick])  # repeats make some rows exactly equal
    d = metrics.sq_dists(x)
    equal = np.array([[np.array_equal(a, b) for b in x] for a in x])
    assert ((d == 0) == equal).all()
    np.testing.assert_array_equal(d, d.T)
    assert (d >= 0).all()


@given(st.lists(st.floats(0, 1), min_size=2, max_size=20), st.randoms(use_true_random=False))
def test_std_and_interval_invariant_to_run_order(values, rnd):
    shuffled = values[:]
    rnd.shuffle(shuffled)
    assert metrics.sample_std(shuffled) == metrics.sample_std(values)
    assert metrics.std_ci(shuffled) == metrics.std_ci(values)


def test_equal_pair_fraction_counts_pairs_without_a_pair_matrix():
    keys = ["a", "a", "b", "a", "c", "b"]
    brute = np.mean([keys[i] == keys[j] for i in range(6) for j in range(i + 1, 6)])
    assert metrics.equal_pair_fraction(keys) == pytest.approx(brute) == 4 / 15
    assert metrics.equal_pair_fraction(["x"] * 5) == 1.0 and metrics.equal_pair_fraction(list("abcd")) == 0.0
    assert math.isnan(metrics.equal_pair_fraction(["x"]))
