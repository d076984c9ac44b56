"""Coverage of every interval the tables print, and the size of every test, at 3 to 20 replicas.

    python bench/bench_coverage.py [--trials N] [--seed S]

Users run 3 to 20 replicas per setting, so that is where an interval must hold its stated 95%.
Each statistic is computed by the project's own functions (orchestrator.metrics) on simulated
replicas with a known truth, `--trials` times (default 2000: a coverage of 95% is then measured
within about ±1%, two standard errors), in four scenarios:

  normal            accuracies are independent normal draws
  normal, paired    replica r of both sides shares its seeds: correlation 0.7 between them
  heavy             10% of replicas come from a poor-convergence mode 6σ below the others
                    (each side on its own), the rest normal; standardised to mean 0, std 1
  heavy, paired     both

First table: coverage (share of trials whose interval holds the truth; a NaN interval counts as a
miss and is counted apart) and median width. Width is (hi - lo) / truth for the scale statistics
(acc_std, acc_std_dist, share, churn_share, overhead), (hi - lo) / σ for diff, hi - lo for
p_a_gt_b. Single-group statistics have no paired scenario (—). overhead: R = det/nondet pairs of
blocks ("paired": a pair shares the drift of its moment; otherwise every block drifts alone).

Second table: how often each test rejects at α = 0.05 when the null is true (size) and when it is
false (power), and the power a run count from `replicas_needed` really reaches.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
from scipy import stats

from orchestrator import metrics

RS = (3, 5, 10, 20)
SCENARIOS = [("normal", False, False), ("normal, paired", False, True), ("heavy", True, False),
             ("heavy, paired", True, True)]
RHO = 0.7  # correlation of paired replicas
OUTLIER, DROP = 0.1, 6.0  # heavy tails: share of replicas in a poor mode, and how far below it sits
MIX_MEAN, MIX_STD = -OUTLIER * DROP, math.sqrt(1 + DROP ** 2 * OUTLIER * (1 - OUTLIER))


def draws(rng, shape, heavy: bool, z: np.ndarray | None = None) -> np.ndarray:
    """Standardised replica noise (mean 0, std 1): normal, or with OUTLIER of replicas DROP σ down."""
    z = rng.standard_normal(shape) if z is None else z
    return (z - DROP * (rng.random(shape) < OUTLIER) - MIX_MEAN) / MIX_STD if heavy else z


def two_sides(rng, r: int, heavy: bool, paired: bool, delta: float = 0.0, ratio: float = 1.0):
    """(a, b): r accuracies a side in units of b's σ: a = delta + sqrt(ratio)·X_a, b = X_b."""
    z = rng.standard_normal((2, r))
    if paired:
        z[0] = RHO * z[1] + math.sqrt(1 - RHO ** 2) * z[0]
    return delta + math.sqrt(ratio) * draws(rng, r, heavy, z[0]), draws(rng, r, heavy, z[1])


# --- the intervals: (interval function, truth) per scenario ---------------------------------------

def acc_std(rng, r, heavy, paired):
    x = draws(rng, r, heavy)
    return metrics.std_ci(x), 1.0


def acc_std_dist(rng, r, heavy, paired, n=400, tau=0.02):
    """Each run shifts every example's chance of being right by d ~ tau·X (Jordan 2023's
    distribution-wise variance, tau²(1 - 1/N)) on top of independent per-example flips."""
    q = rng.uniform(0.3, 0.7, n)
    correct = rng.random((r, n)) < q + tau * draws(rng, (r, 1), heavy)
    _, lo, hi = metrics.distribution_var(correct)
    return (math.sqrt(max(lo, 0)), math.sqrt(max(hi, 0))), tau * math.sqrt(1 - 1 / n)


def share(rng, r, heavy, paired):
    a, b = two_sides(rng, r, heavy, paired, ratio=0.5)
    return metrics.variance_share_ci(a, b, paired)[1:], 0.5


def diff(rng, r, heavy, paired):
    a, b = two_sides(rng, r, heavy, paired, delta=0.75)
    return metrics.t_interval(metrics.mean_diff(a, b, paired)), 0.75


class ProbImprovement:
    """P(A > B) for independent draws of each side's distribution (the truth by Monte Carlo)."""

    def __init__(self, rng):
        a, b = (draws(rng, 10 ** 6, True) for _ in range(2))
        self.heavy = float(np.mean(a + 0.75 > b))
        self.normal = float(stats.norm.cdf(0.75 / math.sqrt(2)))

    def __call__(self, rng, r, heavy, paired):
        a, b = two_sides(rng, r, heavy, paired, delta=0.75)
        return metrics.prob_improvement_ci(a, b, paired)[1:], self.heavy if heavy else self.normal


class ChurnShare:
    """Replica k flips each of N test examples of one model to another of C classes with its own
    rate q_k·w_i (w_i: how hard example i is; q_k = q·exp(0.5 z_k), heavy: z + 2 for 10% of
    replicas), source q = 0.05, reference 0.1. Two replicas disagree on example i with probability
    1 - (1 - p)(1 - p') - pp'/(C - 1), whose mean over replica pairs gives the true churn."""

    N, C = 300, 10

    def __init__(self, rng):
        self.w = rng.gamma(0.5, 2.0, self.N)
        self.base = rng.integers(0, self.C, self.N)
        z = rng.standard_normal(10 ** 6)
        self.truth = {heavy: self.churn(self.rates(z, 0.05, heavy, rng)) / self.churn(self.rates(z, 0.1, heavy, rng))
                      for heavy in (False, True)}

    def rates(self, z, q, heavy, rng):
        z = z + 2.0 * (rng.random(z.shape) < OUTLIER) if heavy else z
        return np.minimum(q * np.exp(0.5 * z), 1 / self.w.max())

    def churn(self, rates):
        m = rates.mean() * self.w  # independent replicas: E[p p'] = E[p]²
        return float(np.mean(2 * m - m * m * self.C / (self.C - 1)))

    def preds(self, rng, rates):
        p = rates[:, None] * self.w[None, :]
        flip = rng.random(p.shape) < p
        return np.where(flip, (self.base + 1 + rng.integers(0, self.C - 1, p.shape)) % self.C, self.base)

    def __call__(self, rng, r, heavy, paired):
        z = rng.standard_normal((2, r))
        if paired:
            z[0] = RHO * z[1] + math.sqrt(1 - RHO ** 2) * z[0]
        num = self.preds(rng, self.rates(z[0], 0.05, heavy, rng))
        den = self.preds(rng, self.rates(z[1], 0.1, heavy, rng))
        return metrics.churn_share_ci(num, den, paired)[1:], self.truth[heavy]


def overhead(rng, r, heavy, paired, steps=10, ratio=1.2):
    """r det/nondet pairs of blocks of `steps` steps: det steps take 1.2x. Each block drifts by
    exp(0.1 z) (shared by the two blocks of a pair when paired) and by its own exp(0.03 z); each
    step has exp(0.05 z) noise, and heavy: 5% of steps are 3x stragglers. True ratio 1.2."""
    det, nondet = [], []
    for _ in range(r):
        drift = math.exp(0.1 * rng.standard_normal())
        for side, factor in ((det, ratio), (nondet, 1.0)):
            own = drift if paired else math.exp(0.1 * rng.standard_normal())
            block = own * math.exp(0.03 * rng.standard_normal())
            t = factor * block * np.exp(0.05 * rng.standard_normal(steps))
            side.append(t * np.where(rng.random(steps) < 0.05, 3.0, 1.0) if heavy else t)
    return metrics.median_ratio_ci(det, nondet, paired=paired)[1:], ratio


# --- the tests: p-value functions, under the null and an alternative ------------------------------

def p_test(a, b, paired):
    return metrics.t_test(metrics.mean_diff(a, b, paired))[1]


def p_variance(a, b, paired):
    return metrics.paired_scale_p(a, b) if paired else metrics.brown_forsythe_p(a, b)


def p_pitman_morgan(a, b, paired):
    """The test p_vs_control / p_vs_algo used before (Pearson's t-test of corr(a + b, a - b))."""
    return float(stats.pearsonr(a + b, a - b).pvalue)


def rejects(rng, trials, r, heavy, paired, p_of, **alternative) -> float:
    return float(np.mean([p_of(*two_sides(rng, r, heavy, paired, **alternative), paired) < 0.05
                          for _ in range(trials)]))


def tost_rejects(rng, trials, r, heavy, paired, delta, margin=0.5) -> float:
    return float(np.mean([metrics.tost_p(metrics.mean_diff(*two_sides(rng, r, heavy, paired, delta=delta), paired),
                                         margin) < 0.05 for _ in range(trials)]))


def power_at_replicas_needed(rng, trials, heavy, paired, effect=1.0) -> tuple[float, float]:
    """replicas_needed for `effect` σ at the true stds, and the power a Monte Carlo finds there."""
    stds = (math.sqrt(2 * (1 - RHO)),) if paired else (1.0, 1.0)
    n = int(metrics.replicas_needed(effect, stds))
    return n, rejects(rng, trials, n, heavy, paired, p_test, delta=effect)


# --- tables ----------------------------------------------------------------------------------------

# (column, method, interval function, has a paired scenario, width relative to the truth)
INTERVALS = [("acc_std", "chi-square", acc_std, False, True),
             ("acc_std_dist", "chi-square - per-example", acc_std_dist, False, True),
             ("share", "F | Pitman–Morgan", share, True, True),
             ("churn_share", "jackknife, log", None, True, True),
             ("diff", "Welch t | paired t", diff, True, False),
             ("p_a_gt_b", "Newcombe score | x design effect", None, True, False),
             ("overhead", "jackknife over pairs, log", overhead, True, True)]


def coverage(rng, fn, r, heavy, paired, trials, relative) -> str:
    hits, nans, widths = 0, 0, []
    for _ in range(trials):
        (lo, hi), truth = fn(rng, r, heavy, paired)
        if math.isnan(lo) or math.isnan(hi):
            nans += 1
            continue
        hits += lo <= truth <= hi
        widths.append((hi - lo) / (truth if relative else 1.0))
    nan = f" NaN {nans / trials:.0%}" if nans else ""
    return f"{hits / trials:6.1%} {np.median(widths) if widths else math.nan:6.3g}{nan}"


def line(cells: list[str], widths: list[int]) -> str:
    return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header, widths), rule, *(line(r, widths) for r in rows)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=2000, help="simulated experiments per cell")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    fns = {"churn_share": ChurnShare(rng), "p_a_gt_b": ProbImprovement(rng)}
    start = time.perf_counter()
    rows = []
    for name, method, fn, two, relative in INTERVALS:
        fn = fn or fns[name]
        for r in RS:
            rows.append([name, method, str(r)] + [coverage(rng, fn, r, heavy, paired, args.trials, relative)
                                                  if two or not paired else "—" for _, heavy, paired in SCENARIOS])
    print(f"Intervals at 95%: coverage and median width, {args.trials} simulated experiments per cell\n")
    print(table(["statistic", "method (independent | paired)", "R", *(s for s, _, _ in SCENARIOS)], rows))

    t = max(args.trials, 1000)
    rows = []
    for name, method, p_of, null, alt in (
            ("p", "Welch t | paired t", p_test, {}, {"delta": 1.0}),
            ("p_vs_control, p_vs_algo", "Brown–Forsythe | paired Brown–Forsythe", p_variance, {}, {"ratio": 4.0}),
            ("(before) p_vs_*", "Pitman–Morgan", p_pitman_morgan, {}, {"ratio": 4.0})):
        for r in RS[1:]:
            rows.append([name, method, str(r)] + [" ".join(
                f"{rejects(rng, t, r, heavy, paired, p_of, **which):6.1%}" for which in (null, alt))
                for _, heavy, paired in SCENARIOS])
    for r in RS[1:]:
        rows.append(["tost_p (margin 0.5σ)", "TOST, Welch t | paired t", str(r)] + [
            f"{tost_rejects(rng, t, r, heavy, paired, 0.5):6.1%} {tost_rejects(rng, t, r, heavy, paired, 0.0):6.1%}"
            for _, heavy, paired in SCENARIOS])
    cells = []
    for _, heavy, paired in SCENARIOS:
        n, power = power_at_replicas_needed(rng, t, heavy, paired)
        cells.append(f"     — {power:6.1%} at n={n}")
    rows.append(["replicas_needed (1σ)", "t-test power by quadrature", "-"] + cells)
    print(f"\nTests at alpha 0.05: rejection rate under the null (size) and under an alternative (power), "
          f"{t} experiments each\n(alternatives: p a difference of 1σ; p_vs_* a variance ratio of 4; tost_p sides "
          f"equal, null at the margin; replicas_needed: the power reached at its n)\n")
    print(table(["test", "method (independent | paired)", "R", *(s for s, _, _ in SCENARIOS)], rows))
    print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
