"""Pure metric functions: numpy arrays in, numbers out. No I/O, no pandas; `reduce.py` feeds them.

Shapes: R replicas (runs), N test examples, C classes. Every function returns NaN rather than
raising when the statistic is undefined (fewer than two runs, an empty test set), so one thin
group never stops a table.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
from scipy import stats

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


def std_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """Interval of the sample std (ddof=1) with stated coverage: the chi-square interval, exact
    when the values are independent draws of one normal distribution (accuracies of replicas are
    close to that; heavy tails or a few diverged runs make it too narrow). Unlike a percentile
    bootstrap, it does not under-cover at 5-10 runs: at n=5 the 95% interval is about
    [0.60 s, 2.87 s]. NaN below two values; (0, 0) when all values are equal."""
    v = np.sort(np.asarray(values, dtype=np.float64))
    if len(v) < 2:
        return math.nan, math.nan
    s = float(_std(v))
    if s == 0.0:
        return 0.0, 0.0
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


def brown_forsythe_p(a: Sequence[float], b: Sequence[float]) -> float:
    """p-value that two groups' accuracy variances differ: Levene's test centred on the median
    (Brown–Forsythe), robust to the skewed, heavy-tailed accuracy distributions that a few
    diverging replicas produce. NaN below two values per group; 1.0 when both groups have zero
    spread (their variances are equal and the F ratio would be 0/0)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) < 2 or len(b) < 2:
        return math.nan
    if np.ptp(a) == 0 and np.ptp(b) == 0:
        return 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(stats.levene(a, b, center="median").pvalue)


def pitman_morgan_p(a: Sequence[float], b: Sequence[float]) -> float:
    """p-value that two *paired* groups' accuracy variances differ: Pitman–Morgan test.

    a[r] and b[r] are replica r of two presets that share seeds (common random numbers), so they
    are correlated and a test for independent groups has the wrong size. For any bivariate normal
    pair, var(a) = var(b) exactly when a+b and a−b are uncorrelated; the test is Pearson's
    t-test of that correlation (n−2 degrees of freedom). NaN below three pairs; 1.0 when a+b or
    a−b does not vary (the two spreads are then equal in the sample: both zero, or b = a + c)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) != len(b):
        raise ValueError(f"paired samples of different lengths: {len(a)} and {len(b)}")
    if len(a) < 3:
        return math.nan
    s, d = a + b, a - b
    if np.ptp(s) == 0 or np.ptp(d) == 0:
        return 1.0
    return float(stats.pearsonr(s, d).pvalue)


def percentile_ci(data: tuple, statistic, seed: int, n_boot: int, level: float, **options) -> tuple[float, float]:
    """scipy's percentile bootstrap interval of `statistic` over `data`, from a seeded generator.
    A resampling distribution with one value (two presets whose paired replicas are bitwise equal:
    every resample gives the same ratio) is a valid answer, [x, x]; scipy warns about it, which
    would only alarm the user, so that warning is silenced here and nowhere else."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        res = stats.bootstrap(data, statistic, n_resamples=n_boot, confidence_level=level, method="percentile",
                              rng=np.random.default_rng(seed), **options)
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def median_ratio_ci(num_units: Sequence[np.ndarray], den_units: Sequence[np.ndarray], seed: int,
                    n_boot: int = 2000, level: float = 0.95, paired: bool = False) -> tuple[float, float, float]:
    """median(num) / median(den) and a seeded percentile bootstrap interval of it.

    Each side is a list of units (arrays of step times); the bootstrap resamples whole units.
    Pass blocks of consecutive steps as units: steps within a block share clocks and caches, and
    resampling them one by one would count correlated steps as independent evidence and give too
    narrow an interval. Unpaired, each side is resampled on its own. `paired`: num_units[k] and
    den_units[k] were measured together (a det/nondet pair of blocks, alternated to cancel drift),
    so pair k is resampled as one unit and drift stays cancelled in every resample. NaN interval
    below two units a side (two pairs when paired).
    """
    if paired and len(num_units) != len(den_units):
        raise ValueError(f"paired units of different counts: {len(num_units)} and {len(den_units)}")
    num, den = _Units(num_units), _Units(den_units)
    if not num.n or not den.n:
        return math.nan, math.nan, math.nan
    ratio = float(np.median(num.values) / np.median(den.values))
    if num.n < 2 or den.n < 2:
        return ratio, math.nan, math.nan
    return ratio, *percentile_ci((np.arange(num.n), np.arange(den.n)),
                                 lambda i, j: np.median(num.take(i)) / np.median(den.take(j)), seed, n_boot, level,
                                 vectorized=False, paired=paired)


class _Units:
    """Variable-length units packed in one array, so that a resample of unit ids is gathered in a
    few numpy calls rather than a Python loop over units."""

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


def class_accuracy(preds: np.ndarray, labels: np.ndarray) -> tuple[float, list[float]]:
    """Accuracy and per-class accuracy (index = class, 0 for a class with no test example), from
    1-D integer predictions and labels of equal length."""
    correct = preds == labels
    n = int(labels.max()) + 1
    hits = np.bincount(labels, weights=correct, minlength=n)
    return float(correct.mean()), (hits / np.maximum(np.bincount(labels, minlength=n), 1)).tolist()


# --- decisions: which source makes the variance, is a difference real, how many replicas ---------

def variance_share_ci(num: Sequence[float], den: Sequence[float], seed: int, paired: bool,
                      n_boot: int = 2000, level: float = 0.95) -> tuple[float, float, float]:
    """var(num) / var(den) (ddof=1) and a seeded percentile bootstrap interval over replicas.

    `paired`: num[i] and den[i] are replica i of two presets, which share that replica's seeds;
    resampling replicas jointly keeps that correlation and narrows the interval. Exactly 0 with
    [0, 0] when num has no spread at all (a preset that varies nothing on this stack), NaN when
    den has none (nothing to be a share of) or either side has fewer than two values.
    """
    a, b = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    if len(a) < 2 or len(b) < 2 or np.ptp(b) == 0:
        return math.nan, math.nan, math.nan
    if np.ptp(a) == 0:
        return 0.0, 0.0, 0.0

    def ratio(x, y, axis=-1):
        with np.errstate(divide="ignore", invalid="ignore"):  # a resample of 3 replicas can repeat one
            return _std(x, axis=axis) ** 2 / _std(y, axis=axis) ** 2
    return float(ratio(a, b)), *percentile_ci((a, b), ratio, seed, n_boot, level, paired=paired)


def _pair_means(d: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Mean of pair matrix d (R, R) over the pairs of each resample in `ids` (B, R'), leaving
    out pairs of a replica with its own copy (0 by construction: they would pull churn down).
    With c the (B, R) counts of each replica in a resample, the sum over pairs is c·d·c, and
    pairs of distinct replicas number R'² - Σc². NaN for a resample of one replica only."""
    ids = np.atleast_2d(ids)
    b, r = len(ids), len(d)
    c = np.bincount((ids + r * np.arange(b)[:, None]).ravel(), minlength=b * r).reshape(b, r).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return ((c @ d) * c).sum(axis=1) / (ids.shape[1] ** 2 - (c * c).sum(axis=1))


def churn_share_ci(num_preds: np.ndarray, den_preds: np.ndarray, seed: int, paired: bool,
                   n_boot: int = 2000, level: float = 0.95) -> tuple[float, float, float]:
    """churn(num) / churn(den) and a seeded percentile bootstrap interval over replicas (jointly
    resampled when `paired`, as in `variance_share_ci`). preds: (R, N) int. Exactly 0 with
    [0, 0] when num's replicas all agree, NaN when den's do or a side has fewer than two runs."""
    if len(num_preds) < 2 or len(den_preds) < 2:
        return math.nan, math.nan, math.nan
    dn, dd = pairwise_disagreement(num_preds), pairwise_disagreement(den_preds)
    if not dd.any():
        return math.nan, math.nan, math.nan
    if not dn.any():
        return 0.0, 0.0, 0.0

    def ratio(i, j=None, axis=-1):
        with np.errstate(divide="ignore", invalid="ignore"):
            return _pair_means(dn, i) / _pair_means(dd, i if j is None else j)
    data = (np.arange(len(dn)),) if paired else (np.arange(len(dn)), np.arange(len(dd)))
    return churn(num_preds) / churn(den_preds), *percentile_ci(data, ratio, seed, n_boot, level)


def mean_diff_ci(a: Sequence[float], b: Sequence[float], seed: int, paired: bool,
                 n_boot: int = 2000, level: float = 0.95) -> tuple[float, float, float]:
    """mean(a) - mean(b) and a seeded percentile bootstrap interval (replicas resampled jointly
    when `paired`: replica i of each side shares its seeds, so seed luck cancels)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) < 2 or len(b) < 2:
        return (float(a.mean() - b.mean()) if len(a) and len(b) else math.nan), math.nan, math.nan
    return float(a.mean() - b.mean()), *percentile_ci(
        (a, b), lambda x, y, axis=-1: x.mean(axis=axis) - y.mean(axis=axis), seed, n_boot, level, paired=paired)


def prob_improvement(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    """P(A > B) + P(A = B)/2 for one run drawn from each side: the Mann–Whitney U of a over
    n_a·n_b (Agarwal et al. 2021's probability of improvement), 0.5 when the sides are equal.
    From midranks of the pooled values: U = (rank sum of a) - n_a(n_a+1)/2."""
    a = np.moveaxis(np.asarray(a, dtype=np.float64), axis, -1)
    b = np.moveaxis(np.asarray(b, dtype=np.float64), axis, -1)
    na, nb = a.shape[-1], b.shape[-1]
    ranks = stats.rankdata(np.concatenate((a, b), axis=-1), axis=-1)
    return (ranks[..., :na].sum(axis=-1) - na * (na + 1) / 2) / (na * nb)


def prob_improvement_ci(a: Sequence[float], b: Sequence[float], seed: int, n_boot: int = 2000,
                        level: float = 0.95) -> tuple[float, float, float]:
    """P(A > B) and a seeded percentile bootstrap interval, the sides resampled independently
    (the probability is defined over independent draws). NaN below two runs a side."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) < 2 or len(b) < 2:
        return math.nan, math.nan, math.nan
    return float(prob_improvement(a, b)), *percentile_ci((a, b), prob_improvement, seed, n_boot, level)


def welch_power(effect: float, std_a: float, std_b: float, n: int, alpha: float = 0.05) -> float:
    """Power of a two-sided Welch t-test at level alpha with n runs a side, when the true means
    differ by `effect` and the true stds are std_a, std_b: the noncentral t with the
    Welch–Satterthwaite degrees of freedom."""
    va, vb = std_a ** 2 / n, std_b ** 2 / n
    if va + vb == 0:
        return 1.0 if effect else alpha
    df = (va + vb) ** 2 / ((va ** 2 + vb ** 2) / (n - 1))
    ncp, crit = abs(effect) / math.sqrt(va + vb), stats.t.ppf(1 - alpha / 2, df)
    return float(stats.nct.sf(crit, df, ncp) + stats.nct.cdf(-crit, df, ncp))


def replicas_needed(effect: float, std_a: float, std_b: float, power: float = 0.8, alpha: float = 0.05,
                    n_max: int = 10 ** 7) -> float:
    """Smallest n (runs per side, >= 2) at which a two-sided Welch t-test at level alpha detects a
    true mean difference `effect` with probability `power`, given the sides' stds. inf when no
    n up to n_max does (a zero effect is never detected), NaN when an input is NaN."""
    if any(math.isnan(x) for x in (effect, std_a, std_b)):
        return math.nan
    if effect == 0 or welch_power(effect, std_a, std_b, n_max, alpha) < power:
        return math.inf
    lo, hi = 1, 2  # power grows with n: double, then bisect; power(lo) < target <= power(hi)
    while welch_power(effect, std_a, std_b, hi, alpha) < power:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if welch_power(effect, std_a, std_b, mid, alpha) >= power else (mid, hi)
    return float(hi)


# Parts of the cost of determinism: part -> (upper mode, lower mode), each the step from one probe
# mode (orchestrator/probe.py) to the next, in units of the median non-deterministic step, so that
# kernels + fill = total exactly. `inductor` is the share of `kernels` that inductor's own
# deterministic mode adds to a compiled workload.
COST_PARTS = {"total": ("det", "nondet"), "kernels": ("det_nofill", "nondet"), "fill": ("det", "det_nofill"),
              "inductor": ("det_nofill", "det_noinductor")}


def cost_parts(blocks: dict[str, Sequence[np.ndarray]], seed: int, n_boot: int = 2000,
               level: float = 0.95) -> dict[str, tuple[float, float, float]]:
    """part -> (percent, lo, hi) for every COST_PARTS entry: (median upper - median lower) / median
    nondet × 100. `blocks[mode][k]`: the step times of that mode's block in repeat k, every mode
    with one block per repeat (complete repeats only); a part whose modes are absent is NaN.

    Interval: `median_ratio_ci` of upper over lower, paired by repeat, scaled by median lower /
    median nondet. Where lower is nondet (total, kernels) that scale is 1 and the interval is the
    paired bootstrap's own; for fill and inductor the scale is taken at its point estimate, so the
    interval leaves out its uncertainty, a second-order term (the part times the scale's relative
    error) beside the ratio's."""
    base = np.median(np.concatenate(blocks["nondet"])) if len(blocks.get("nondet", ())) else math.nan
    parts = {}
    for part, (upper, lower) in COST_PARTS.items():
        if not len(blocks.get(upper, ())) or not len(blocks.get(lower, ())):
            parts[part] = (math.nan, math.nan, math.nan)
            continue
        ratio = median_ratio_ci(blocks[upper], blocks[lower], seed, n_boot=n_boot, level=level, paired=True)
        scale = np.median(np.concatenate(blocks[lower])) / base
        parts[part] = tuple(float((r - 1) * scale * 100) for r in ratio)
    return parts
