"""Pure metric functions: numpy arrays in, numbers out. No I/O, no pandas; `reduce.py` feeds them.

Shapes: R replicas (runs), N test examples, C classes. Every function returns NaN rather than
raising when the statistic is undefined (fewer than two runs, an empty test set), so one thin
group never stops a table.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from scipy import optimize, stats

EPS = np.finfo(np.float64).eps


def churn(preds: np.ndarray) -> float:
    """Mean over all replica pairs of the fraction of test examples whose predictions differ.

    This is *disagreement*: 0 when every replica predicts the same class everywhere, 1 when no
    two replicas ever agree. (The reference study's code calls its agreement rate "churn"; ours is
    one minus that.) preds: (R, N) int.

    Vectorised without visiting pairs: sort each example's R predictions, so equal labels form
    runs; a run of length L holds L(L-1)/2 agreeing pairs. O(N·R·log R) whatever the number of
    classes, instead of O(N·R²) for a loop over pairs or O(N·C) memory for per-class counts.
    """
    p = np.asarray(preds)
    r, n = p.shape
    if r < 2 or n == 0:
        return math.nan
    s = np.sort(p.T, axis=1)  # (N, R), each example's predictions in order
    run_start = np.empty(s.shape, dtype=bool)
    run_start[:, 0] = True
    np.not_equal(s[:, 1:], s[:, :-1], out=run_start[:, 1:])
    lengths = np.diff(np.append(np.flatnonzero(run_start), s.size))  # runs never cross rows
    pairs = n * r * (r - 1) // 2
    return (pairs - int((lengths * (lengths - 1)).sum() // 2)) / pairs  # one rounding: exact 0 and 1


def pairwise_disagreement(preds: np.ndarray) -> np.ndarray:
    """(R, R) fraction of test examples on which replicas i and j predict differently; zero
    diagonal. Use `churn` for the mean: this one is O(N·R²), for when the pairs themselves matter
    (cross-stack comparisons). preds: (R, N) int."""
    p = np.asarray(preds)
    r, n = p.shape
    d = np.zeros((r, r))
    if n == 0:
        return np.full((r, r), math.nan)
    for i in range(r - 1):
        d[i, i + 1:] = np.count_nonzero(p[i + 1:] != p[i], axis=1) / n
    return d + d.T


def sq_dists(x: np.ndarray) -> np.ndarray:
    """(R, R) squared Euclidean distances between the rows of x (R, n), in float64.

    Gram-matrix trick: ||a - b||² = a·a + b·b - 2 a·b, one BLAS matmul for all pairs. Rows are
    first centred on their mean (distances do not move) so that the cancellation is relative to
    the spread between replicas, not to the weight norm. A pair whose Gram result lies within
    the rounding bound of the dot products (n·eps·(a·a + b·b), with a factor of 4 to spare) is
    recomputed directly from the original rows: equal rows give exactly 0, and distinct rows
    (float32 or narrower, so their squared differences cannot underflow) never do.
    """
    x = np.asarray(x, dtype=np.float64)
    c = x - x.mean(axis=0)
    g = c @ c.T
    sq = np.diag(g)
    norms = sq[:, None] + sq[None, :]
    d = norms - 2.0 * g
    for i, j in zip(*np.nonzero(np.triu(d <= 4.0 * max(x.shape[1], 1) * EPS * norms, k=1))):
        diff = x[i] - x[j]
        d[i, j] = diff @ diff
    d = np.maximum(np.triu(d, k=1), 0.0)
    return d + d.T


def mean_over_pairs(d: np.ndarray) -> float:
    """Mean of a symmetric pair matrix (R, R) over its R(R-1)/2 pairs; the diagonal is ignored.
    NaN with fewer than two runs."""
    d = np.asarray(d, dtype=np.float64)
    return float(d[np.triu_indices(len(d), k=1)].mean()) if len(d) >= 2 else math.nan


def equal_pair_fraction(keys: Sequence[object]) -> float:
    """Share of the R(R-1)/2 pairs whose keys are equal (e.g. weight digests), from the counts of
    each distinct key: O(R), where comparing all pairs would hold an (R, R) matrix. NaN below 2."""
    r = len(keys)
    if r < 2:
        return math.nan
    counts = np.unique(np.asarray(keys, dtype=object), return_counts=True)[1]
    return float((counts * (counts - 1)).sum() / (r * (r - 1)))


def identical(keys: Sequence[object]) -> bool:
    """Whether runs are bit-for-bit the same: every key (weights digest) present and equal. Only
    this makes a spread, share or difference *exactly* zero; equal accuracies do not (they tie at
    the test set's resolution). False for no runs or a missing digest."""
    k = list(keys)
    return bool(k) and all(x is not None and x == x and x == k[0] for x in k)


def _std(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Sample std (ddof=1) along `axis`, exactly 0 for equal values: np.std of 50 copies of 0.8856
    is 2e-16 (the mean rounds), which would read as noise in a control group. Shifting by the
    first value first changes nothing else, since the std is shift-invariant."""
    return np.std(x - np.take(x, [0], axis=axis), axis=axis, ddof=1)


def sample_std(values: Sequence[float]) -> float:
    """Sample standard deviation (ddof=1), NaN below two values. Values are sorted first so the
    result is bit-for-bit independent of the order runs were listed in."""
    v = np.sort(np.asarray(values, dtype=np.float64))
    return float(_std(v)) if len(v) >= 2 else math.nan


def column_std(x: np.ndarray) -> np.ndarray:
    """(C,) sample std (ddof=1) of each column of an (R, C) array across its rows, exactly 0 for a
    column of equal values and bit-for-bit independent of the row order (columns are sorted
    first). NaN below two rows."""
    a = np.sort(np.asarray(x, dtype=np.float64), axis=0)
    return _std(a, axis=0) if a.shape[0] >= 2 else np.full(a.shape[1], math.nan)


def _var_ci(var: float, n: int, level: float) -> tuple[float, float]:
    """Chi-square interval of a variance: (n-1)s²/σ² ~ χ²(n-1) for n independent normal values,
    so [(n-1)s²/χ²_{1-α/2}, (n-1)s²/χ²_{α/2}] covers σ² with probability `level` exactly."""
    alpha = 1.0 - level
    df = n - 1
    return df * var / stats.chi2.ppf(1.0 - alpha / 2, df), df * var / stats.chi2.ppf(alpha / 2, df)


ROBUST_MIN = 5  # Bonett's intervals need 5 values a group: his trim proportion 1/(2·sqrt(n - 4))


def _bonett_applies(n: int, level: float) -> bool:
    """Whether `_bonett_log_ci` is defined for groups of at least n values: 5 a group for the trimmed
    mean, and n > z + 1 so that Bonett's small-sample factor n/(n - z) stays positive and below n."""
    return n >= ROBUST_MIN and n > float(stats.norm.ppf(0.5 + level / 2)) + 1


def _bonett_log_ci(groups: Sequence[np.ndarray], level: float) -> tuple[float, float]:
    """(centre, half-width) on the log scale of Bonett's `level` interval for one group's variance
    or for the ratio of two groups' variances (the first over the second), which holds its level
    when the values have heavier tails than normal, where the chi-square and F intervals do not: a
    tenth of replicas diverged 6σ down made the chi-square interval cover 67% at 10 replicas.

    The variance of log s² is about (γ - (n - 3)/n)/(n - 1), γ the kurtosis; Bonett estimates γ as
    n·Σ(x - m)⁴/(Σ(x - x̄)²)², m the mean trimmed by 1/(2·sqrt(n - 4)) (the median at 5 values), and
    corrects the small-sample bias of log s² by c = n/(n - z). One group (Bonett 2006, "Approximate
    confidence interval for standard deviation of nonnormal distributions", CSDA 50:775-782):
    log(c·s²) ± z·c·sqrt((γ - (n - 3)/n)/(n - 1)). Two groups (Bonett 2006, "Robust confidence
    interval for a ratio of standard deviations", Applied Psychological Measurement 30:432-439), γ
    pooled over both (the sums over both groups, n = n₁ + n₂): log(c₁s₁²/(c₂s₂²)) ± z·sqrt(Σⱼ (γ -
    (nⱼ - 3)/nⱼ)/(nⱼ - 1)). Needs `_bonett_applies`."""
    z = float(stats.norm.ppf(0.5 + level / 2))
    n = np.array([len(g) for g in groups], dtype=np.float64)
    ss = np.array([float(_std(g)) ** 2 for g in groups]) * (n - 1)
    m4 = sum(float(np.sort((g - stats.trim_mean(g, 0.5 / math.sqrt(len(g) - 4))) ** 4).sum()) for g in groups)
    kurt = n.sum() * m4 / ss.sum() ** 2
    c = n / (n - z)
    log_var = np.log(c * ss / (n - 1))
    v = (kurt - (n - 3) / n) / (n - 1)
    if len(groups) == 1:
        return float(log_var[0]), z * float(c[0]) * math.sqrt(v[0])
    return float(log_var[0] - log_var[1]), z * math.sqrt(float(v.sum()))


def tie_var(n_test: int) -> float:
    """The variance an accuracy can hide at the test set's resolution: replicas with different
    weights but equal accuracies (multiples of 1/n_test, so ties are common at a few hundred
    examples) still vary, by up to about a step. res²/12 is Sheppard's rounding variance of a step
    res = 1/n_test; intervals that would be [0, 0] for tied accuracies take it as the variance they
    cannot rule out, so "no noise" stays a claim about identical weights. 0 without a test set."""
    return 1.0 / (12.0 * n_test * n_test) if n_test else 0.0


def std_ci(values: Sequence[float], level: float = 0.95, floor_var: float = 0.0) -> tuple[float, float]:
    """Interval of the sample std (ddof=1) with stated coverage. From ROBUST_MIN (5) values Bonett's
    interval (`_bonett_log_ci`), which estimates the kurtosis and so widens when a replica diverged:
    with a tenth of replicas 6σ down the chi-square interval covered 72% at 5 values and 67% at 10,
    Bonett's 94% and 77% (no interval can do much better at 10: a third of such samples hold no
    diverged replica and look normal); on normal values it covers 94-99.5%, and is wider than the
    chi-square interval at 5-6 values (at 5 its median ends are 0.37 s and 4.4 s, the chi-square's
    0.60 s and 2.87 s). Below 5 values the chi-square interval, exact for independent normal draws
    (heavy tails make it too narrow). Unlike a percentile bootstrap, neither under-covers normal
    values at 5-10 runs. NaN below two values. When all values are equal: (0, 0) only for an exact
    group (`floor_var` 0: identical weights); otherwise the values tie at the test set's resolution
    and the upper end is the chi-square bound of `floor_var` (`tie_var`), not 0."""
    v = np.sort(np.asarray(values, dtype=np.float64))
    if len(v) < 2:
        return math.nan, math.nan
    s = float(_std(v))
    if s == 0.0:
        return 0.0, math.sqrt(_var_ci(floor_var, len(v), level)[1])
    if _bonett_applies(len(v), level):
        centre, h = _bonett_log_ci([v], level)
        return math.exp((centre - h) / 2), math.exp((centre + h) / 2)
    lo, hi = _var_ci(s * s, len(v), level)
    return math.sqrt(lo), math.sqrt(hi)


def per_example_std(correct: np.ndarray) -> float:
    """The accuracy std that independent per-example flips alone would give (Jordan 2023, "On the
    variance of neural network training with respect to test sets and distributions").

    correct: (R, N) bool or 0/1, replica × test example. If example i is right in a run with
    probability pᵢ, independently of the other examples, accuracy has variance Σᵢ pᵢ(1−pᵢ)/N².
    pᵢ is estimated by example i's correctness rate across the R replicas, and pᵢ(1−pᵢ) by
    p̂ᵢ(1−p̂ᵢ)·R/(R−1) (the ddof=1 variance of a 0/1 column), which makes the variance estimate
    unbiased. Every replica is scored on the same test set, so this is not a binomial
    sqrt(p(1-p)/N): an example all replicas get right (or all wrong) contributes nothing, and
    the result is exactly 0 when the replicas agree on every example. NaN below two replicas or
    with no examples."""
    c = np.asarray(correct, dtype=np.float64)
    r, n = c.shape
    if r < 2 or n == 0:
        return math.nan
    return math.sqrt(_per_example_var(c))


def _per_example_var(c: np.ndarray) -> float:
    """Σᵢ p̂ᵢ(1−p̂ᵢ)·R/(R−1) / N², in integers until the last division: 0 exactly when no
    example flips. c: (R, N) 0/1."""
    r, n = c.shape
    k = c.sum(axis=0)  # replicas that got example i right
    return float((k * (r - k)).sum()) / (r * (r - 1)) / (n * n)


def distribution_var(correct: np.ndarray, level: float = 0.95) -> tuple[float, float, float]:
    """The distribution-wise part of the accuracy variance and its interval: (var, lo, hi).

    Jordan (2023) splits run-to-run accuracy variance into what independent per-example flips
    give (`per_example_std`²) and a remainder, the covariance of examples, which is how much the
    runs differ on the test *distribution* and is what would remain with an infinite test set.
    Estimate: the sample variance (ddof=1) of the replicas' accuracies (row means of `correct`)
    minus the per-example variance; both are unbiased, so the difference is, and it can come out
    negative when the flips explain all the spread.

    Interval: the chi-square interval of the accuracy variance (`std_ci`'s, assuming normal
    accuracies) shifted by the per-example variance, treated as known. That part sums N
    per-example terms, so its own sampling error is small beside the chi-square interval's width
    at 5-50 replicas; a bootstrap over replicas would under-cover at those counts, as it does for
    the std. Ends may be negative; the reducer reports sqrt(max(·, 0)). NaN below two replicas."""
    c = np.asarray(correct, dtype=np.float64)
    r, n = c.shape
    if r < 2 or n == 0:
        return math.nan, math.nan, math.nan
    acc_var = float(_std(np.sort(c.mean(axis=1))) ** 2)
    pe = _per_example_var(c)
    lo, hi = _var_ci(acc_var, r, level)
    return acc_var - pe, lo - pe, hi - pe


def per_class_spread(per_class: np.ndarray) -> tuple[float, float, int | None]:
    """From (R, C) per-class accuracies: the largest and the mean across-replica std (ddof=1)
    of a class, and the index of the class with the largest (lowest index on ties; None when no
    class moves at all). Top-1 accuracy averages these swings away; the worst class shows where
    the noise lands."""
    a = np.asarray(per_class, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] < 2 or a.shape[1] == 0:
        return math.nan, math.nan, None
    s = column_std(a)
    return float(s.max()), float(s.mean()), int(np.argmax(s)) if s.max() > 0 else None


def binary_rates(preds: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per replica, the false-positive and false-negative rates of a binary task (positive class
    1) on the given examples: (R,) each, NaN where there are no negatives / positives."""
    p, y = np.asarray(preds), np.asarray(labels)
    neg, pos = y == 0, y == 1
    with np.errstate(invalid="ignore", divide="ignore"):
        fpr = np.count_nonzero((p == 1) & neg, axis=1) / np.count_nonzero(neg)
        fnr = np.count_nonzero((p != 1) & pos, axis=1) / np.count_nonzero(pos)
    return fpr, fnr


BF_MIN = 5  # unpaired Brown–Forsythe: replicas a group for a p-value that holds its size


def brown_forsythe_p(a: Sequence[float], b: Sequence[float]) -> float:
    """p-value that two independent groups' accuracy variances differ: Levene's test centred on
    the median (Brown–Forsythe), robust to the skewed, heavy-tailed accuracy distributions that a
    few diverging replicas produce. NaN below BF_MIN (5) values in a group, where it does not hold
    its size: with 4 a group the two middle deviations from the median are equal and the test
    rejected equal variances 7.0% (normal) and 9.7% (heavy tails) of the time at α = 0.05 (4,000
    simulations each); with 3 it never rejects; with 2 it rejects whatever the data (p ≈ 3e-29).
    From 5 a group it held 0.7-4.5% at 5-10 a group. 1.0 when both groups have zero spread (their
    variances are equal and the F ratio would be 0/0)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) < BF_MIN or len(b) < BF_MIN:
        return math.nan
    if np.ptp(a) == 0 and np.ptp(b) == 0:
        return 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(stats.levene(np.sort(a), np.sort(b), center="median").pvalue)


def paired_scale_p(a: Sequence[float], b: Sequence[float]) -> float:
    """p-value that two *paired* groups' accuracy variances differ: a sign-flip permutation test of
    the paired differences x[r] = |a[r] - median(a)| - |b[r] - median(b)| (paired Brown–Forsythe).

    a[r] and b[r] are replica r of two presets that share seeds, so they are correlated. Under equal
    scales each x[r] is symmetric about 0, so every one of the 2^n sign patterns of x is equally
    likely: the p-value is the share of patterns whose |Σ| reaches the observed |Σx| (`sign_flip_p`:
    exact size ≤ α; all 2^n patterns up to 32 pairs, a fixed-seed 2^16 sample above). The one-sample t-test of
    x used before held 7.0% at 4 pairs; a permutation test cannot exceed its level. With n pairs the
    smallest p is 2/2^n: 0.125 at 3 (it can never reject), so NaN below 4 pairs ("too few pairs").
    Absolute deviations grow only linearly with an outlier, so shared diverged replicas do not drive
    it. 1.0 when the deviations are equal pair by pair."""
    a, b = _paired_arrays(a, b)
    if len(a) < 4:
        return math.nan
    return sign_flip_p(np.abs(a - np.median(a)) - np.abs(b - np.median(b)))


FLIP_EXACT = 32  # values up to which every sign pattern is counted (two halves of 2^16); sampled above


def _signed_sums(x: np.ndarray) -> np.ndarray:
    """Σ s·x over all 2^len(x) sign patterns s, built by doubling (no matrix of patterns)."""
    sums = np.zeros(1)
    for v in x:
        sums = np.concatenate((sums + v, sums - v))
    return sums


def sign_flip_p(x: Sequence[float]) -> float:
    """Two-sided sign-flip (randomization) p-value of the mean of x: the share of the 2^n sign
    patterns s whose |Σ s·x| reaches the observed |Σ x|. Exact (size ≤ α) for any x symmetric about
    0 under the null, whatever its law, lattice and ties included; it conditions on |x|, so its
    smallest p is 2/2^n (2/2^k with k nonzero values: zeros carry no sign). Because Σ x² does not
    change with the signs, the paired t statistic (and its se floored at a constant) is monotone in
    |Σ s·x|: this is also the exact randomization p of the paired t-test. Every pattern is counted
    up to FLIP_EXACT values, meeting in the middle (the sums of each half, one sorted and searched:
    0.2 ms at 20 values, 20 ms at 32); above, a fixed-seed sample of 2^16 patterns
    whose first is the identity, so the p counts the observed pattern (the (1 + k)/(1 + B) rule
    that keeps a sampled permutation p valid). Sorted first: the p does not depend on the order
    the pairs came in."""
    x = np.sort(np.asarray(x, dtype=np.float64))
    observed = abs(float(x.sum())) - 1e-12 * float(np.abs(x).sum())
    if not len(x) or observed <= 0:
        return 1.0
    if len(x) > FLIP_EXACT:
        signs = np.random.default_rng(0).choice((-1.0, 1.0), size=(2 ** 16, len(x)))
        signs[0] = 1.0
        return float(np.mean(np.abs(signs @ x) >= observed))
    left, right = _signed_sums(x[: len(x) // 2]), np.sort(_signed_sums(x[len(x) // 2:]))
    reach = (len(right) - np.searchsorted(right, observed - left, side="left")
             + np.searchsorted(right, -observed - left, side="right"))
    return float(reach.sum() / (len(left) * len(right)))


def holm(ps: Sequence[float]) -> np.ndarray:
    """Holm-adjusted p-values of one family: a table that prints a test per row gives a false
    verdict somewhere far more often than α (20.6% of tables at 5 sources, 46% at 12 compare
    groups); verdicts read from these keep that chance at α, for any dependence between rows. NaN
    rows are not in the family and stay NaN. Written out (step-down: the k-th smallest p times
    m - k + 1, made monotone, capped at 1) rather than statsmodels' multipletests, which runs
    gc.collect() on every call: 43 ms per table in a process that holds torch."""
    p = np.asarray(ps, dtype=np.float64)
    out = np.full(p.shape, math.nan)
    ok = np.flatnonzero(~np.isnan(p))
    order = ok[np.argsort(p[ok], kind="stable")]
    m = len(order)
    out[order] = np.minimum(np.maximum.accumulate(p[order] * (m - np.arange(m))), 1.0)
    return out


def _jackknife_var(replicates: np.ndarray) -> float:
    """Jackknife variance (n-1)/n · Σ(θ_k - θ̄)² of n leave-one-out replicates, summed in sorted
    order so that it is bit for bit the same whatever order the units came in."""
    t = np.sort(np.asarray(replicates, dtype=np.float64))
    return (len(t) - 1) / len(t) * float(np.sort((t - t.mean()) ** 2).sum())


def _welch_df(variances, dfs) -> np.ndarray:
    """Welch–Satterthwaite degrees of freedom of a sum of independent variance estimates (axis 0),
    each with its own df: (Σv)² / Σ(v²/df). Where every estimate is 0 the sum has no error and any
    df will do: the smallest is returned."""
    v = np.asarray(variances, dtype=np.float64)
    d = np.asarray(dfs, dtype=np.float64).reshape((-1,) + (1,) * (v.ndim - 1))
    num, den = v.sum(axis=0) ** 2, (v * v / d).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, d.min())


def _log_ratio_ci(ratio: float, num_loo: np.ndarray, den_loo: np.ndarray, paired: bool,
                  level: float) -> tuple[float, float]:
    """Interval of ratio = num/den from the leave-one-out values of num and den: a delete-one
    jackknife of log(ratio), with a t quantile on n-1 (paired: unit k left out of both) or Welch
    degrees of freedom. The log is linearised (log x - log x̄ ≈ x/x̄ - 1), so a leave-one-out value
    of 0 (all other replicas of a preset identical) needs no special case."""
    u = np.asarray(num_loo, dtype=np.float64)
    v = np.asarray(den_loo, dtype=np.float64)
    u, v = u / np.sort(u).mean(), v / np.sort(v).mean()
    if paired:
        var, df = _jackknife_var(u - v), len(u) - 1
    else:
        va, vb = _jackknife_var(u), _jackknife_var(v)
        var, df = va + vb, float(_welch_df([va, vb], [len(u) - 1, len(v) - 1]))
    h = float(stats.t.ppf(0.5 + level / 2, df)) * math.sqrt(var)
    with np.errstate(over="ignore"):
        return ratio * float(np.exp(-h)), ratio * float(np.exp(h))


def _signed_rank_cdf(n: int) -> np.ndarray:
    """P(T+ <= t), t = 0 … n(n+1)/2, of Wilcoxon's signed-rank statistic for n pairs under its null:
    the coefficients of Π_k (1 + x^k) / 2. scipy computes this table inside `wilcoxon` but does not
    expose it, and the interval needs its quantile, not a p-value."""
    pmf = np.zeros(n * (n + 1) // 2 + 1)
    pmf[0] = 1.0
    for k in range(1, n + 1):
        pmf[k:] = (pmf[k:] + pmf[:-k].copy()) / 2
        pmf[:k] /= 2
    return np.cumsum(pmf)


def hodges_lehmann_ci(d: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """Hodges–Lehmann estimate of the centre of d (the median of its Walsh averages (d_i + d_j)/2,
    i <= j) and a `level` interval of it: the exact Wilcoxon signed-rank interval (the Walsh
    averages of rank k and M + 1 - k, k from the exact null distribution), valid for any symmetric
    distribution of d, outliers included. Below 6 values that interval cannot reach 95% (its widest,
    min to max, holds 1 - 2^(1-n): 87.5% at 4, 93.75% at 5), so there the t interval of the mean of
    d is given instead: exact for normal d, and a wild value widens it rather than moving it past the
    truth. NaN interval below two values."""
    d = np.sort(np.asarray(d, dtype=np.float64))
    n = len(d)
    if not n:
        return math.nan, math.nan, math.nan
    walsh = np.sort((d[:, None] + d[None, :])[np.triu_indices(n)] / 2)
    centre = float(np.median(walsh))
    if n < 2:
        return centre, math.nan, math.nan
    k = int(np.searchsorted(_signed_rank_cdf(n), (1 - level) / 2, side="right"))  # #t with P(T+ <= t) <= α/2
    if k == 0:
        h = float(stats.t.ppf(0.5 + level / 2, n - 1)) * float(_std(d)) / math.sqrt(n)
        return centre, float(d.mean()) - h, float(d.mean()) + h
    return centre, float(walsh[k - 1]), float(walsh[len(walsh) - k])


def median_ratio_ci(num_units: Sequence[np.ndarray], den_units: Sequence[np.ndarray], level: float = 0.95,
                    paired: bool = False) -> tuple[float, float, float]:
    """A ratio of typical step times, num over den, and a `level` interval of it.

    Each side is a list of units (arrays of step times). Pass blocks of consecutive steps as units:
    steps within a block share clocks and caches, and treating them one by one would count
    correlated steps as independent evidence.

    `paired`: num_units[k] and den_units[k] were measured together (a det/nondet pair of blocks
    alternated to cancel drift, or the control and impl replicas of one seed). Each pair gives one
    log ratio of its block medians (the median shrugs off straggler steps; the pair cancels drift);
    the ratio is exp of their Hodges–Lehmann estimate with the signed-rank interval
    (`hodges_lehmann_ci`; t below 6 pairs). The delete-one jackknife of the ratio of pooled medians
    used before covered 88-90% from 6 to 20 pairs when whole blocks carry their own noise and a few
    are disturbed (bench/bench_coverage.py). NaN interval below two pairs.

    Unpaired (the benches' run-level comparisons): median(num) / median(den) over all steps, with a
    delete-one-unit jackknife of the log ratio, Welch degrees of freedom (`_log_ratio_ci`); NaN
    interval below two units a side.
    """
    if paired and len(num_units) != len(den_units):
        raise ValueError(f"paired units of different counts: {len(num_units)} and {len(den_units)}")
    num, den = _Units(num_units), _Units(den_units)
    if not num.n or not den.n:
        return math.nan, math.nan, math.nan
    if paired:
        logs = [math.log(np.median(a) / np.median(b)) for a, b in zip(num_units, den_units)]
        return tuple(float(np.exp(v)) for v in hodges_lehmann_ci(logs, level))
    ratio = float(np.median(num.values) / np.median(den.values))
    if num.n < 2 or den.n < 2:
        return ratio, math.nan, math.nan
    return ratio, *_log_ratio_ci(ratio, num.loo_medians(), den.loo_medians(), paired, level)


class _Units:
    """Variable-length units packed in one array, so that a subset of units is gathered in a few
    numpy calls rather than a Python loop over units."""

    def __init__(self, units: Sequence[np.ndarray]):
        arrays = [np.asarray(u, dtype=np.float64).ravel() for u in units]
        self.n = len(arrays)
        self.values = np.concatenate(arrays) if arrays else np.empty(0)
        self.lengths = np.array([len(a) for a in arrays], dtype=np.int64)
        self.starts = np.cumsum(self.lengths) - self.lengths

    def take(self, ids: np.ndarray) -> np.ndarray:
        """The values of units `ids`, concatenated in that order."""
        lengths = self.lengths[ids]
        ends = np.cumsum(lengths)
        offset = np.repeat(self.starts[ids] - (ends - lengths), lengths)
        return self.values[np.arange(ends[-1] if len(ends) else 0) + offset]

    def loo_medians(self) -> np.ndarray:
        """(n,) median of all values but those of unit k, for each k."""
        ids = np.arange(self.n)
        return np.array([np.median(self.take(np.delete(ids, k))) for k in ids])


# --- decisions: which source makes the variance, is a difference real, how many replicas ---------
#
# Every interval below is exact under a stated assumption (normal accuracies: F, Pitman–Morgan, t)
# or a jackknife or score interval whose coverage bench/bench_coverage.py measures at 3-20 replicas.
# None resamples at random: an interval depends on the values alone, not on a seed, on the group it
# belongs to or on the order rows were read in (values are put in a canonical order first).

SHARE_FACTOR = 4.0  # a share interval is informative when hi/lo <= this: the share known within x2 either way
QUAD = 100  # χ² quantile points per variance in `t_test_power`: < 0.001 from a Monte Carlo of 200,000 runs


def _paired_arrays(a: Sequence[float], b: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Paired values as float arrays in one canonical order (by a, then b), so that sums over pairs
    do not depend on the order replicas were listed in. ValueError when the lengths differ."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) != len(b):
        raise ValueError(f"paired samples of different lengths: {len(a)} and {len(b)}")
    order = np.lexsort((b, a))
    return a[order], b[order]


def _sides(a: Sequence[float], b: Sequence[float], paired: bool) -> tuple[np.ndarray, np.ndarray]:
    """Two samples in canonical order: pairs kept together when `paired`, each side sorted otherwise."""
    if paired:
        return _paired_arrays(a, b)
    return np.sort(np.asarray(a, dtype=np.float64)), np.sort(np.asarray(b, dtype=np.float64))


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation, exactly 1 for identical samples (sqrt(x·x) = |x| in IEEE arithmetic)."""
    ca, cb = a - a.mean(), b - b.mean()
    return float(np.clip((ca @ cb) / math.sqrt((ca @ ca) * (cb @ cb)), -1.0, 1.0))


def _share_factors(n_num: int, n_den: int, r: float, paired: bool, level: float) -> tuple[float, float]:
    """The variance share's interval as factors of the estimate F = s_a²/s_b²: [F·lo, F·hi].

    Independent groups of normal values: (s_a²/σ_a²) / (s_b²/σ_b²) ~ F(n_a - 1, n_b - 1), so
    lo = 1/F_{1-α/2} and hi = 1/F_{α/2}, exactly. Paired (bivariate normal, sample correlation r):
    σ_a²/σ_b² = λ exactly when a + √λ·b and a - √λ·b are uncorrelated (Pitman 1939, Morgan 1939);
    the λ that Pearson's t-test of that correlation (n - 2 df) does not reject are
    [F/(K + √(K²-1)), F·(K + √(K²-1))] with K = 1 + 2t²(1 - r²)/(n - 2), t the 1-α/2 quantile:
    exact whatever the correlation between the pairs."""
    alpha = 1.0 - level
    if paired:
        k = 1.0 + 2.0 * float(stats.t.ppf(1 - alpha / 2, n_num - 2)) ** 2 * (1.0 - r * r) / (n_num - 2)
        w = k + math.sqrt(k * k - 1.0)
        return 1.0 / w, w
    return (1.0 / float(stats.f.ppf(1 - alpha / 2, n_num - 1, n_den - 1)),
            1.0 / float(stats.f.ppf(alpha / 2, n_num - 1, n_den - 1)))


def _tie_attenuation(a: np.ndarray, b: np.ndarray, floor_var: float) -> float:
    """Factor on the paired replicas' correlation for accuracies rounded to the test set's
    resolution: sqrt(s_a² s_b² / ((s_a² + v)(s_b² + v))), v = `floor_var`, the correlation of the
    values with the rounding variance they hide added back (Sheppard). Three rounded pairs are
    often exactly collinear (r = ±1), which made the Pitman–Morgan interval zero-wide: at 360 test
    examples and 3 pairs it covered 79% and a 5-source table read a false verdict in 26%. 1 without
    a `floor_var` (the caller passes 0 for a side against itself, the reference's own row: the same
    runs round alike). Equal values are not the same runs: three rounded pairs of two presets often
    tie pair by pair, and taking that as exact made the interval [1, 1] (92.0% coverage at 3 pairs)."""
    if not floor_var:
        return 1.0
    va, vb = float(_std(a)) ** 2, float(_std(b)) ** 2
    return math.sqrt(va * vb / ((va + floor_var) * (vb + floor_var)))


def variance_share_ci(num: Sequence[float], den: Sequence[float], paired: bool,
                      level: float = 0.95, floor_var: float = 0.0) -> tuple[float, float, float]:
    """var(num) / var(den) (ddof=1) and its `level` interval: for independent presets Bonett's
    interval with a pooled kurtosis (`_bonett_log_ci`) from ROBUST_MIN (5) replicas a preset, the F
    interval below; the Pitman–Morgan interval when `paired` (num[i] and den[i] are replica i of two
    presets that share that replica's seeds; `_share_factors`). F and Pitman–Morgan are exact **if
    the accuracies are normal**; heavy tails (a tenth of replicas diverged, each preset on its own)
    made the F interval cover 67-73% at 5-20 replicas and a 5-source table read a false verdict in
    31-58%, where Bonett's covers about 90-95% and holds normal accuracies at 95-98%, as measured by
    bench/bench_coverage.py. The percentile bootstrap used before was NaN for every group at 3
    replicas and 81% of paired ones at 5 (a resample that repeats one replica has no variance), and
    covered 88-92% at 10.

    Exactly 0 with [0, 0] when num has no spread and `floor_var` is 0 (identical weights: a preset
    that varies nothing on this stack). Tied accuracies of different weights give 0 with the upper
    end the interval's for a variance of `floor_var` (`tie_var`), so the share is not called exact.
    NaN when den has none (nothing to be a share of) or a side has fewer than two values;
    a NaN interval for two paired replicas (the paired interval needs three).
    """
    a, b = _sides(num, den, paired)
    if len(a) < 2 or len(b) < 2 or np.ptp(b) == 0:
        return math.nan, math.nan, math.nan
    ratio = float(_std(a)) ** 2 / float(_std(b)) ** 2
    if ratio == 0 and floor_var == 0:
        return 0.0, 0.0, 0.0
    if paired and len(a) < 3:
        return ratio, math.nan, math.nan
    tied = ratio == 0  # no correlation to estimate: r = 0 gives the paired interval's widest factors
    if share_by_bonett(min(len(a), len(b)), paired, tied, level):
        centre, h = _bonett_log_ci([a, b], level)
        return ratio, math.exp(centre - h), math.exp(centre + h)
    r = _corr(a, b) * _tie_attenuation(a, b, floor_var) if paired and not tied else 0.0
    lo, hi = _share_factors(len(a), len(b), r, paired, level)
    if tied:
        return 0.0, 0.0, floor_var / float(_std(b)) ** 2 * hi
    return ratio, ratio * lo, ratio * hi


def share_by_bonett(n: int, paired: bool, tied: bool = False, level: float = 0.95) -> bool:
    """Whether `variance_share_ci` gives Bonett's interval (independent presets of n replicas or more
    each, not tied) or else F / Pitman–Morgan: one rule for the interval and the table's note."""
    return not paired and not tied and _bonett_applies(n, level)


def share_replicas(r: float, n_pairs: int, paired: bool, level: float = 0.95, factor: float = SHARE_FACTOR) -> float:
    """Replicas per preset with which the share interval would span at most `factor` (hi/lo): for
    independent presets, or paired ones whose replicas correlate like the `n_pairs` pairs seen
    (sample correlation r). The interval's relative width depends on the replica count and the
    correlation only, not on the share, so the count can be known before running them. The
    correlation is taken at the lower 95% bound of its magnitude (Fisher's z; 0 from three pairs
    or fewer), so that a correlation seen in a few pairs does not promise too few replicas. NaN
    for a NaN r when paired."""
    if paired and math.isnan(r):
        return math.nan
    if paired and abs(r) < 1:
        z = math.atanh(abs(r)) - float(stats.norm.ppf(0.5 + level / 2)) / math.sqrt(n_pairs - 3) if n_pairs > 3 else 0.0
        r = math.tanh(max(z, 0.0))

    def narrow(n: int) -> bool:
        lo, hi = _share_factors(n, n, r, paired, level)
        return hi / lo <= factor
    return _smallest(narrow, 3 if paired else 2, 10 ** 6)


def share_correlation(num: Sequence[float], den: Sequence[float]) -> float:
    """Correlation of paired replicas' accuracies, as the paired share interval uses it; NaN below
    three pairs or without spread on a side."""
    a, b = _paired_arrays(num, den)
    return _corr(a, b) if len(a) >= 3 and np.ptp(a) > 0 and np.ptp(b) > 0 else math.nan


def _loo_pair_means(d: np.ndarray) -> np.ndarray:
    """(R,) mean of pair matrix d (R, R) over the pairs without replica k, for each k. Row sums are
    taken in sorted order, so the values only move with the replicas, not with their order."""
    r = len(d)
    rows = np.sort(d, axis=1).sum(axis=1)
    return (np.sort(rows).sum() / 2 - rows) / ((r - 1) * (r - 2) / 2)


def churn_share_ci(num_preds: np.ndarray, den_preds: np.ndarray, paired: bool,
                   level: float = 0.95) -> tuple[float, float, float]:
    """churn(num) / churn(den) and a `level` interval: a delete-one-replica jackknife of the log
    ratio (`_log_ratio_ci`; replica k left out of both presets when `paired`). Churn is a mean over
    replica pairs with no exact distribution to lean on; the jackknife needs 3 replicas a preset and
    holds its rate at 3-20 (bench/bench_coverage.py), where the percentile bootstrap it replaced was
    NaN in 81-100% of groups at 3-5 replicas (a resample of one replica has no pairs) and covered
    88-89% at 10.
    preds: (R, N) int, rows in replica order. Exactly 0 with [0, 0] when num's replicas all agree,
    NaN when den's do or a side has fewer than two runs; a NaN interval with two."""
    if len(num_preds) < 2 or len(den_preds) < 2:
        return math.nan, math.nan, math.nan
    dn, dd = pairwise_disagreement(num_preds), pairwise_disagreement(den_preds)
    if not dd.any():
        return math.nan, math.nan, math.nan
    if not dn.any():
        return 0.0, 0.0, 0.0
    ratio = churn(num_preds) / churn(den_preds)
    if min(len(dn), len(dd)) < 3:
        return ratio, math.nan, math.nan
    return ratio, *_log_ratio_ci(ratio, _loo_pair_means(dn), _loo_pair_means(dd), paired, level)


class MeanDiff(NamedTuple):
    """mean(a) - mean(b) with what a t-test of it needs."""

    diff: float
    se: float  # its estimated standard error; NaN below two runs a side (two pairs)
    df: float  # degrees of freedom of the t statistic
    test: str  # "paired t" or "Welch t"
    p: float = math.nan  # the exact sign-flip p that replaces the t distribution's (`mean_diff`); NaN: t's


FLIP_MIN = 6  # pairs from which tied paired differences take the sign-flip p: its smallest p 2/2^6 < 0.05
TIED_SPREAD = 2.0  # paired differences are "tied" while their root mean square is under this many steps


def mean_diff(a: Sequence[float], b: Sequence[float], paired: bool, floor_var: float = 0.0) -> MeanDiff:
    """The mean difference and its t statistic's parts. `paired`: replica r of each side shares its
    seeds, so the paired t-test (the differences a[r] - b[r], n - 1 df) lets seed luck cancel;
    otherwise Welch's unequal-variance t (Welch–Satterthwaite df). Exact (paired) or very nearly so
    (Welch) **if the accuracies are normal**. `floor_var` (`tie_var`, per side) floors the squared
    standard error at what tied accuracies can hide: at 360 test examples and 2-4 replicas the
    differences often tie, the se comes out 0 or tiny and the t-test rejected a true null 13.6% of
    the time at R=2. 0 for sides that are each exact (identical weights within a side).

    Tied paired differences take the exact sign-flip p of the t statistic (`sign_flip_p`) in place
    of the t distribution's, from FLIP_MIN pairs: differences of rounded accuracies are whole steps
    of res = 1/n_test (res² = 12·floor_var), often 0, and configurations such as seven differences
    of one sign and three zeros give t = 4.6, p = 0.0013 at 10 pairs, but 2/2^7 = 0.016 by their
    signs. The t-test rejected at 1.2-1.6 times its level at the 0.05/12 Holm reaches over 12
    groups (5.8% of 12-group tables with a false p_adj < 0.05 at 10 pairs, 6-7% at 6, replica std
    1-1.5 steps; bench_coverage and 48,000-test simulations); at a std of 3 steps and more it held.
    "Tied" is read from the differences' root mean square, which the signs do not change (so the
    choice keeps the sign-flip p exact): under TIED_SPREAD steps. Below FLIP_MIN pairs the sign flip
    cannot reject at 0.05 at all (smallest p 2/2^5 = 0.0625 at 5) and the floored t-test stays,
    measured at or under its level there on ties. Welch's side needs nothing (at most 5.2 ± 0.4% of
    12-group tables on unpaired ties, R = 2 to 20) and has no sign-flip analogue (a label
    permutation tests equal laws, not equal means)."""
    a, b = _sides(a, b, paired)
    test = "paired t" if paired else "Welch t"
    if not len(a) or not len(b):
        return MeanDiff(math.nan, math.nan, math.nan, test)
    diff = float(a.mean() - b.mean())
    if len(a) < 2 or len(b) < 2:
        return MeanDiff(diff, math.nan, math.nan, test)
    if paired:
        d = a - b
        se = float(_std(d)) / math.sqrt(len(a))
        tied = len(d) >= FLIP_MIN and float(np.mean(d * d)) < TIED_SPREAD ** 2 * 12 * floor_var
        p = sign_flip_p(d) if tied else math.nan
        return MeanDiff(diff, max(se, math.sqrt(2 * floor_var / len(a))), len(a) - 1.0, test, p)
    va, vb = (max(float(_std(x)) ** 2, floor_var) / len(x) for x in (a, b))
    return MeanDiff(diff, math.sqrt(va + vb), float(_welch_df([va, vb], [len(a) - 1, len(b) - 1])), test)


def t_interval(m: MeanDiff, level: float = 0.95) -> tuple[float, float]:
    """diff ± t_{1-α/2, df}·se; [diff, diff] when se is 0 (no spread: every replica agrees, the
    difference is exact), NaN without an se."""
    if math.isnan(m.se):
        return math.nan, math.nan
    h = float(stats.t.ppf(0.5 + level / 2, m.df)) * m.se if m.se > 0 else 0.0
    return m.diff - h, m.diff + h


def t_test(m: MeanDiff) -> tuple[float, float]:
    """(t, two-sided p) of the mean difference; with se 0 the difference is exact: p = 0 unless it
    is 0 (then p = 1). The p is `m.p` where mean_diff took the exact sign-flip p (tied pairs)."""
    if math.isnan(m.se):
        return math.nan, math.nan
    if m.se == 0:
        return (math.copysign(math.inf, m.diff) if m.diff else 0.0), (0.0 if m.diff else 1.0)
    t = m.diff / m.se
    return t, (m.p if not math.isnan(m.p) else float(2 * stats.t.sf(abs(t), m.df)))


def tost_p(m: MeanDiff, margin: float) -> float:
    """p-value of equivalence within ±margin by two one-sided tests (TOST, Schuirmann 1987): the
    larger of the one-sided p-values of diff > -margin and diff < margin. Below α it says the
    difference lies inside the margin, which "not significantly different" never says; the same
    as the (1 - 2α) t interval lying inside (-margin, margin). With se 0: 0 when |diff| < margin,
    else 1."""
    if math.isnan(m.se):
        return math.nan
    if m.se == 0:
        return 0.0 if abs(m.diff) < margin else 1.0
    return float(max(stats.t.sf((m.diff + margin) / m.se, m.df), stats.t.sf((margin - m.diff) / m.se, m.df)))


def prob_improvement(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    """P(A > B) + P(A = B)/2 for one run drawn from each side: the Mann–Whitney U of a over
    n_a·n_b (Agarwal et al. 2021's probability of improvement), 0.5 when the sides are equal.
    From midranks of the pooled values: U = (rank sum of a) - n_a(n_a+1)/2."""
    a = np.moveaxis(np.asarray(a, dtype=np.float64), axis, -1)
    b = np.moveaxis(np.asarray(b, dtype=np.float64), axis, -1)
    na, nb = a.shape[-1], b.shape[-1]
    ranks = stats.rankdata(np.concatenate((a, b), axis=-1), axis=-1)
    return (ranks[..., :na].sum(axis=-1) - na * (na + 1) / 2) / (na * nb)


def _auc_var(theta: float, m: int, n: int) -> float:
    """Variance of the probability of improvement as a function of its true value θ (Hanley and
    McNeil 1982, with Newcombe's (m + n)/2 - 1 in place of both m - 1 and n - 1)."""
    k = (m + n) / 2 - 1
    return theta * (1 - theta) / (m * n) * (1 + k * ((1 - theta) / (2 - theta) + theta / (1 + theta)))


def _design_effect(a: np.ndarray, b: np.ndarray) -> float:
    """How much pairing changes the variance of the probability of improvement: var(P_a + P_b) /
    (var P_a + var P_b) over the pairs, P_a[r] the share of b that a[r] beats and P_b[r] the share
    of a that b[r] loses to (the placements whose mean is the estimate). Below 1 when paired runs
    share seed luck. 1 when the placements do not vary (complete separation, all ties) or sum to a
    constant, where there is nothing to estimate it from."""
    wins = (np.sign(a[:, None] - b[None, :]) + 1) / 2
    pa, pb = wins.mean(axis=1), wins.mean(axis=0)
    apart = float(np.var(pa, ddof=1) + np.var(pb, ddof=1))
    together = float(np.var(pa + pb, ddof=1))
    return together / apart if apart > 0 and together > 0 else 1.0


def _tail_inflation(a: np.ndarray, b: np.ndarray, theta: float) -> float:
    """How much larger the placements' own variance (DeLong's var P_a / m + var P_b / n) is than
    the Hanley–McNeil variance at the estimate, at least 1. Hanley–McNeil's formula fits smooth
    distributions; a replica that diverged sits at placement 0 or 1, far from θ, and the formula
    misses that spread: with a replica pair diverged on both sides the paired interval covered
    90.8% at θ = 0.9, R = 20."""
    wins = (np.sign(a[:, None] - b[None, :]) + 1) / 2
    own = float(np.var(wins.mean(axis=1), ddof=1) / len(a) + np.var(wins.mean(axis=0), ddof=1) / len(b))
    model = _auc_var(theta, len(a), len(b))
    return max(1.0, own / model) if model > 0 else 1.0


def prob_improvement_ci(a: Sequence[float], b: Sequence[float], paired: bool = False,
                        level: float = 0.95) -> tuple[float, float, float]:
    """P(A > B) and a `level` score interval (Newcombe 2006, "Confidence intervals for an effect
    size measure based on the Mann–Whitney statistic", method 5): the θ whose Hanley–McNeil variance
    puts the estimate within q standard errors, a Wilson-type interval that stays inside [0, 1].
    q is the t quantile on m + n - 2 df, not z: at 3 runs a side 2 of the 20 equally likely rank
    orders of equal sides are a complete separation, and the z interval, which left 0.5 out there,
    covered 89% at θ = 0.5 (a rank interval that excludes 0.5 on 10% of orders cannot hold 95%).
    `paired`: the variance is scaled by the pairs' design effect (`_design_effect`); treating paired
    sides that share seed luck as independent overstates the variance. Either way it is raised to
    the placements' own variance where that is larger (`_tail_inflation`: diverged replicas). The percentile bootstrap
    used before covered 78% at 3 and 91% at 5. Coverage over θ in {0.5, 0.7, 0.9}:
    bench/bench_coverage.py. NaN below two runs a side; [x, x] when neither side varies."""
    a, b = _sides(a, b, paired)
    if len(a) < 2 or len(b) < 2:
        return math.nan, math.nan, math.nan
    theta = float(prob_improvement(a, b))
    if np.ptp(a) == 0 and np.ptp(b) == 0:
        return theta, theta, theta
    m, n = len(a), len(b)
    f = (_design_effect(a, b) if paired else 1.0) * _tail_inflation(a, b, theta)
    q = float(stats.t.ppf(0.5 + level / 2, m + n - 2))

    def gap(t: float) -> float:  # < 0 inside the interval, 0 at its ends
        return (theta - t) ** 2 - q * q * f * _auc_var(t, m, n)
    eps = 1e-12  # θ = 0 and 1 are roots of gap when θ̂ sits there: search beside them
    lo = optimize.brentq(gap, 0.0, min(theta, 1 - eps)) if theta > 0 else 0.0
    hi = optimize.brentq(gap, max(theta, eps), 1.0) if theta < 1 else 1.0
    return theta, float(lo), float(hi)


def t_test_power(effect: float, stds: Sequence[float], n: int, alpha: float = 0.05) -> float:
    """Power of a two-sided t-test at level alpha with n runs a side (n pairs) when the true mean
    difference is `effect`: stds = (std of the differences,) for the paired t-test, (std_a, std_b)
    for Welch's.

    Exact for normal data up to quadrature error (< 0.001): the mean difference is normal and
    independent of the sample variances, (n-1)s²/σ² ~ χ²(n-1) each, so the power is the average
    over the sample variances of the normal probability that |diff| exceeds the t quantile times
    the estimated standard error, at the df Welch's test computes from those same variances; a
    midpoint rule over QUAD equal-probability χ² quantiles per variance takes that average. The
    noncentral t at the true Welch–Satterthwaite df, used before, is optimistic at small n (0.94
    where a Monte Carlo gives 0.63: effect 0.03, stds 0.004 and 0.004, n=2), and scipy's nct
    returned NaN for effect 0.012, stds 0.001 and 0.002 at n=2. A side with std 0 adds nothing
    (Welch's test is then the other side's one-sample t-test)."""
    s = np.asarray(stds, dtype=np.float64)
    s = s[s > 0]
    if not len(s):
        return 1.0 if effect else alpha
    q = stats.chi2.ppf((np.arange(QUAD) + 0.5) / QUAD, n - 1) / (n - 1)  # s²/σ² at equal-probability points
    v = np.stack([g * (x * x / n) for g, x in zip(np.meshgrid(*([q] * len(s)), indexing="ij"), s)])
    crit = stats.t.ppf(1 - alpha / 2, _welch_df(v, [n - 1] * len(s))) * np.sqrt(v.sum(axis=0))
    se, d = math.sqrt(float((s * s).sum()) / n), abs(effect)
    return float((stats.norm.sf((crit - d) / se) + stats.norm.cdf((-crit - d) / se)).mean())


def assured_stds(stds: Sequence[float], pilot: Sequence[int], assurance: float = 0.8) -> np.ndarray:
    """The stds a power calculation should use when they were themselves estimated from a pilot of
    `pilot[i]` runs (pairs) each: the upper one-sided `assurance` confidence limit of the std, s ·
    sqrt(df / χ²_{1-assurance, df}) (Browne 1995; Julious 2005's "assurance"), with df = n - 1 for
    one std and the Welch–Satterthwaite df of s_a²/n_a + s_b²/n_b for two (both scaled alike). The
    true std lies below it in `assurance` of pilots, so a run count computed from it reaches the
    power in at least that share; from the pilot's std itself (the plug-in) a 5-replica pilot
    reached 80% power in only 46% of pilots. Unchanged (known stds) for a pilot below 2 runs."""
    s = np.asarray(stds, dtype=np.float64)
    n = np.asarray(pilot, dtype=np.float64)
    if len(n) != len(s) or (n < 2).any():
        return s
    df = float(_welch_df(s * s / n, n - 1)) if len(s) > 1 else float(n[0] - 1)
    return s * math.sqrt(df / float(stats.chi2.ppf(1 - assurance, df)))


def replicas_needed(effect: float, stds: Sequence[float], power: float = 0.8, alpha: float = 0.05,
                    n_max: int = 10 ** 7, pilot: Sequence[int] = (), assurance: float = 0.8) -> float:
    """Smallest n (runs per side, or pairs; >= 2) at which a two-sided t-test at level alpha detects
    a true mean difference `effect` with probability `power` (`t_test_power`: one std = the paired
    t-test on the differences, two = Welch's). `pilot`: the runs each std was estimated from; the
    stds are then raised to their upper `assurance` confidence limit (`assured_stds`), so that the
    count reaches the power in `assurance` of pilots rather than about half. inf when no n up to
    n_max does (a zero effect is never detected), NaN when an input is NaN."""
    if math.isnan(effect) or any(math.isnan(x) for x in stds):
        return math.nan
    if effect == 0:
        return math.inf
    stds = assured_stds(stds, pilot, assurance) if len(pilot) else stds
    return _smallest(lambda n: t_test_power(effect, stds, n, alpha) >= power, 2, n_max)


def _smallest(ok, lo: int, hi: int) -> float:
    """Smallest integer n in [lo, hi] with ok(n), for ok false then true as n grows; inf when
    ok(hi) is false. Doubling from lo, then bisection: O(log n) calls."""
    if not ok(hi):
        return math.inf
    if ok(lo):
        return float(lo)
    below, above = lo, min(2 * lo, hi)
    while not ok(above):
        below, above = above, min(2 * above, hi)
    while above - below > 1:
        mid = (below + above) // 2
        below, above = (below, mid) if ok(mid) else (mid, above)
    return float(above)


# Parts of the cost of determinism: part -> (upper mode, lower mode), each the step from one probe
# mode (orchestrator/probe.py) to the next, in units of the median non-deterministic step, so that
# kernels + fill = total exactly. `inductor` is the share of `kernels` that inductor's own
# deterministic mode adds to a compiled workload.
COST_PARTS = {"total": ("det", "nondet"), "kernels": ("det_nofill", "nondet"), "fill": ("det", "det_nofill"),
              "inductor": ("det_nofill", "det_noinductor")}


def cost_parts(blocks: dict[str, Sequence[np.ndarray]], level: float = 0.95) -> dict[str, tuple[float, float, float]]:
    """part -> (percent, lo, hi) for every COST_PARTS entry: (upper - lower) / nondet × 100, each
    mode's step time relative to nondet as `median_ratio_ci` estimates it, paired by repeat
    (Hodges–Lehmann over the repeats' log ratios of block medians), so that kernels + fill = total
    exactly. `blocks[mode][k]`: the step times of that mode's block in repeat k, every mode with
    one block per repeat (complete repeats only); a part whose modes are absent is NaN.

    Interval: `median_ratio_ci` of upper over lower, paired by repeat, minus 1, scaled by lower's
    estimate relative to nondet. Where lower is nondet (total, kernels) that scale is 1 and the
    interval is the signed-rank interval itself; for fill and inductor the scale is taken at its
    point estimate, so the interval leaves out its uncertainty, a second-order term (the part times
    the scale's relative error) beside the ratio's."""
    def relative(mode: str) -> float:
        if mode == "nondet":
            return 1.0
        return median_ratio_ci(blocks[mode], blocks["nondet"], level=level, paired=True)[0]

    parts = {}
    for part, (upper, lower) in COST_PARTS.items():
        if not all(len(blocks.get(m, ())) for m in (upper, lower, "nondet")):
            parts[part] = (math.nan, math.nan, math.nan)
            continue
        scale = relative(lower)
        _, lo, hi = median_ratio_ci(blocks[upper], blocks[lower], level=level, paired=True)
        parts[part] = tuple(float(v * 100) for v in (relative(upper) - scale, (lo - 1) * scale, (hi - 1) * scale))
    return parts
