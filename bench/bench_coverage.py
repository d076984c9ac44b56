"""Coverage of every interval the tables print, the size of every test and verdict, per row and per
table, at 2 to 20 replicas, in the situations that broke them.

    python bench/bench_coverage.py [--trials N] [--quick] [--seed S]

Goal: every interval holds its 95% (at least 93%, the Monte Carlo margin) and every test or verdict
its 5%, per row and per table, where users are: 2-20 replicas, tied accuracies, diverged runs.
Budget: the default (800 trials a cell, a coverage of 95% within ±0.77%, one standard error) takes
about 10 minutes on one 2.8 GHz core; `--quick` (200 trials, ±1.5%) about 2.5. Floor: a cell's
standard error is sqrt(p(1-p)/trials); a difference below two of them is not a finding.

Each statistic is computed by the project's own functions (orchestrator.metrics, sources) on
simulated replicas with a known truth, in five scenarios of accuracies in units of their σ:

  normal            independent normal draws
  normal, paired    replica r of both sides shares its seeds: correlation 0.7
  heavy             10% of replicas in a poor-convergence mode 6σ below the rest, each side on its
                    own (standardised to mean 0, std 1)
  diverged pairs    paired (0.7), and the *same* replica index diverges on both sides (6σ, 10%):
                    the outlier is shared by the pair, as when a seed makes both presets diverge
  ties, n_test 360  paired (0.7), accuracies 0.9 + 1.5/360·X rounded to multiples of 1/360, as the
                    digits demo's test set gives; ties are common at 2-5 replicas. The functions
                    get the resolution (tie_var), as the tables pass it

The truth of each statistic is its population value under the scenario's marginal law (10^6 draws).
Every cell prints the rate in percent with its Monte Carlo standard error; NaN intervals count as
misses and their share is printed. Single-group statistics have no paired scenario (—; ties apart).
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
from scipy import stats

from orchestrator import metrics, sources

RS = (2, 3, 4, 5, 10, 20)
SCENARIOS = [("normal", "normal", False), ("normal, paired", "normal", True), ("heavy", "heavy", False),
             ("diverged pairs", "diverged", True), ("ties, n_test 360", "ties", True)]
RHO = 0.7  # correlation of paired replicas
OUTLIER, DROP = 0.1, 6.0  # share of replicas in a poor mode, and how far below it sits
MIX_MEAN, MIX_STD = -OUTLIER * DROP, math.sqrt(1 + DROP ** 2 * OUTLIER * (1 - OUTLIER))
N_TEST, TIE_SIGMA = 360, 1.5 / 360  # ties: the test set, and the accuracy's std in accuracy units
THETAS = (0.5, 0.7, 0.9)


def floor(kind: str) -> float:
    """tie_var in σ units for the tied scenario, as the tables pass it; 0 elsewhere."""
    return metrics.tie_var(N_TEST) / TIE_SIGMA ** 2 if kind == "ties" else 0.0


def noise(rng, k: int, r: int, kind: str, paired: bool) -> np.ndarray:
    """(k, r) standardised replica noise of k presets: paired, every two presets correlate RHO
    (a shared seed part); heavy, OUTLIER of replicas DROP σ down, each preset on its own; diverged
    and paired, the same replicas on every preset."""
    z = rng.standard_normal((k, r))
    if paired:
        z = math.sqrt(RHO) * rng.standard_normal(r) + math.sqrt(1 - RHO) * z
    if kind in ("heavy", "diverged"):
        drop = rng.random((1, r) if kind == "diverged" and paired else (k, r)) < OUTLIER
        z = (z - DROP * drop - MIX_MEAN) / MIX_STD
    return z


def observed(x: np.ndarray, kind: str) -> np.ndarray:
    """Accuracies as the tables see them: ties, rounded to the test set's resolution (σ units)."""
    if kind != "ties":
        return x
    return np.round((0.9 + TIE_SIGMA * x) * N_TEST) / N_TEST / TIE_SIGMA - 0.9 / TIE_SIGMA


def two_sides(rng, r: int, kind: str, paired: bool, delta: float = 0.0, ratio: float = 1.0):
    """(a, b): r accuracies a side in units of b's σ, a = delta + sqrt(ratio)·X_a, b = X_b."""
    z = noise(rng, 2, r, kind, paired)
    return observed(delta + math.sqrt(ratio) * z[0], kind), observed(z[1], kind)


def population(rng, kind: str, **shape) -> tuple[np.ndarray, np.ndarray]:
    return two_sides(rng, 10 ** 6, kind, False, **shape)


# --- the intervals: (sample -> interval, population -> truth) --------------------------------------

class Interval:
    """One printed interval: `draw` gives (lo, hi) from r replicas, `truth` its population value."""

    single = False  # a single-group statistic: no paired scenarios
    kinds = ("normal", "heavy", "diverged", "ties")

    def __init__(self, rng):
        self.truths = {k: self.truth(rng, k) for k in self.kinds}


class AccStd(Interval):
    name, method, single = "acc_std", "Bonett from 5, chi-square below", True

    def truth(self, rng, kind):
        return float(np.std(population(rng, kind)[1]))

    def draw(self, rng, r, kind, paired):
        return metrics.std_ci(two_sides(rng, r, kind, False)[1], floor_var=floor(kind))


class AccStdDist(Interval):
    """Each run shifts every example's chance of being right by d ~ tau·X (Jordan 2023's
    distribution-wise variance, tau²(1 - 1/N)) on top of independent per-example flips."""

    name, method, single, kinds = "acc_std_dist", "chi-square - per-example", True, ("normal", "heavy")
    N, TAU = 400, 0.02

    def truth(self, rng, kind):
        return self.TAU * math.sqrt(1 - 1 / self.N)

    def draw(self, rng, r, kind, paired):
        q = rng.uniform(0.3, 0.7, self.N)
        d = two_sides(rng, r, kind, False)[1][:, None]
        _, lo, hi = metrics.distribution_var(rng.random((r, self.N)) < q + self.TAU * d)
        return math.sqrt(max(lo, 0)), math.sqrt(max(hi, 0))


class Share(Interval):
    name, method = "share", "Bonett from 5, F | Pitman–Morgan"

    def truth(self, rng, kind):
        a, b = population(rng, kind, ratio=0.5)
        return float(np.var(a) / np.var(b))

    def draw(self, rng, r, kind, paired):
        return metrics.variance_share_ci(*two_sides(rng, r, kind, paired, ratio=0.5), paired, floor_var=floor(kind))[1:]


class Diff(Interval):
    name, method = "diff", "Welch t | paired t"

    def truth(self, rng, kind):
        a, b = population(rng, kind, delta=0.75)
        return float(a.mean() - b.mean())

    def draw(self, rng, r, kind, paired):
        return metrics.t_interval(metrics.mean_diff(*two_sides(rng, r, kind, paired, delta=0.75), paired,
                                                    floor_var=floor(kind)))


class ProbImprovement(Interval):
    """P(A > B) + P(A = B)/2 for one run drawn from each side, at true θ (in the normal scenario;
    the same shift elsewhere)."""

    method = "Newcombe score, t | x design effect"

    def __init__(self, rng, theta):
        self.name, self.delta = f"p_a_gt_b θ={theta}", math.sqrt(2) * float(stats.norm.ppf(theta))
        super().__init__(rng)

    def truth(self, rng, kind):
        a, b = population(rng, kind, delta=self.delta)
        return float(np.mean(a > b) + 0.5 * np.mean(a == b))

    def draw(self, rng, r, kind, paired):
        return metrics.prob_improvement_ci(*two_sides(rng, r, kind, paired, delta=self.delta), paired)[1:]


class ChurnShare(Interval):
    """Replica k flips each of N test examples of one model to another of C classes with its own
    rate q_k·w_i (w_i: how hard example i is; q_k = q·exp(0.5 z_k): replicas differ in how much
    they churn), source q = 0.05, reference 0.1; heavy and diverged: z + 2 for 10% of replicas
    (diverged pairs: the same replica index on both presets). Two replicas disagree on example i
    with probability 1 - (1 - p)(1 - p') - pp'/(C - 1), whose mean over pairs is the true churn."""

    name, method, kinds = "churn_share", "jackknife, log", ("normal", "heavy", "diverged")
    N, C = 300, 10

    def __init__(self, rng):
        self.w = rng.gamma(0.5, 2.0, self.N)
        self.base = rng.integers(0, self.C, self.N)
        super().__init__(rng)

    def truth(self, rng, kind):
        z = self.shift(rng, rng.standard_normal(10 ** 6), kind != "normal")
        return self.churn(self.rates(z, 0.05)) / self.churn(self.rates(z, 0.1))

    @staticmethod
    def shift(rng, z, heavy, mask=None):
        mask = rng.random(z.shape) < OUTLIER if mask is None else mask
        return z + 2.0 * mask if heavy else z

    def rates(self, z, q):
        return np.minimum(q * np.exp(0.5 * z), 1 / self.w.max())

    def churn(self, rates):
        m = rates.mean() * self.w  # independent replicas: E[p p'] = E[p]²
        return float(np.mean(2 * m - m * m * self.C / (self.C - 1)))

    def preds(self, rng, rates):
        p = rates[:, None] * self.w[None, :]
        flip = rng.random(p.shape) < p
        return np.where(flip, (self.base + 1 + rng.integers(0, self.C - 1, p.shape)) % self.C, self.base)

    def draw(self, rng, r, kind, paired):
        z = rng.standard_normal((2, r))
        if paired:
            z[0] = RHO * z[1] + math.sqrt(1 - RHO ** 2) * z[0]
        mask = rng.random((2, r)) < OUTLIER
        if kind == "diverged" and paired:
            mask[0] = mask[1]
        z = np.stack([self.shift(rng, z[i], kind != "normal", mask[i]) for i in (0, 1)])
        num, den = self.preds(rng, self.rates(z[0], 0.05)), self.preds(rng, self.rates(z[1], 0.1))
        return metrics.churn_share_ci(num, den, paired)[1:]


def overhead(rng, r: int, scenario: str, steps: int = 10, ratio: float = 1.2):
    """r det/nondet pairs, true ratio 1.2, the interval `cost_parts` prints (paired by repeat).
    step noise:  probe blocks; a pair drifts by exp(0.1 z), a block by its own exp(0.01 z), steps by
                 exp(0.1 z) and 5% of steps are 3x stragglers.
    block noise: probe blocks; a pair drifts by exp(0.1 z), a block by its own exp(0.05 z), 10% of
                 blocks are disturbed (1.5x: a neighbour's job), steps by exp(0.01 z).
    replicas:    control/impl replicas' epochs (3 a run); each run drifts on its own (separate Tune
                 runs: nothing shared), exp(0.1 z), 10% of runs 1.5x slow, epochs by exp(0.03 z)."""
    det, nondet = [], []
    for _ in range(r):
        shared = math.exp(0.1 * rng.standard_normal())
        for side, factor in ((det, ratio), (nondet, 1.0)):
            if scenario == "step noise":
                block = shared * math.exp(0.01 * rng.standard_normal())
                t = block * np.exp(0.1 * rng.standard_normal(steps)) * np.where(rng.random(steps) < 0.05, 3.0, 1.0)
            elif scenario == "block noise":
                block = shared * math.exp(0.05 * rng.standard_normal()) * (1.5 if rng.random() < 0.1 else 1.0)
                t = block * np.exp(0.01 * rng.standard_normal(steps))
            else:
                block = math.exp(0.1 * rng.standard_normal()) * (1.5 if rng.random() < 0.1 else 1.0)
                t = block * np.exp(0.03 * rng.standard_normal(3))
            side.append(factor * t)
    return metrics.median_ratio_ci(det, nondet, paired=True)[1:]


# --- the tests and verdicts: share of trials (or tables) that reject ------------------------------

def p_test(a, b, paired, kind):
    return metrics.t_test(metrics.mean_diff(a, b, paired, floor_var=floor(kind)))[1]


def p_variance(a, b, paired, kind):
    return metrics.paired_scale_p(a, b) if paired else metrics.brown_forsythe_p(a, b)


def p_tost(a, b, paired, kind, margin=0.5):
    return metrics.tost_p(metrics.mean_diff(a, b, paired, floor_var=floor(kind)), margin)


def false_source_verdict(rng, r, kind, paired, m=5) -> bool:
    """A sources table of m sources exactly as noisy as the reference (true share 1): does any
    row read `below`/`above reference`? Intervals at the family level, as sources_table takes them."""
    x = observed(noise(rng, m + 1, r, kind, paired), kind)
    level = sources.family_level(m)
    return any(sources.share_verdict(False, *metrics.variance_share_ci(a, x[m], paired, level=level,
                                                                       floor_var=floor(kind)))
               in ("below reference", "above reference") for a in x[:m])


def like_at_edge(rng, r, kind, paired) -> bool:
    """A source with true share 1/LIKE_BAND, the edge of the `like reference` band: is it read `like
    reference`? One source, so its interval is at 95%, the narrowest any table takes."""
    a, b = two_sides(rng, r, kind, paired, ratio=1 / sources.LIKE_BAND)
    return sources.share_verdict(False, *metrics.variance_share_ci(a, b, paired, floor_var=floor(kind))) \
        == "like reference"


def false_compare(rng, r, kind, paired, m=12) -> bool:
    """A compare table of m groups with no difference: does any Holm-adjusted p fall below 0.05?"""
    ps = [p_test(*two_sides(rng, r, kind, paired), paired, kind) for _ in range(m)]
    return bool(np.nanmin(metrics.holm(ps), initial=1.0) < 0.05) if not np.isnan(ps).all() else False


def pilots_reaching_power(rng, trials, paired, pilot=5, effect=1.0) -> tuple[float, float]:
    """Share of `pilot`-replica pilots (normal, σ 1 a side; paired correlation RHO) whose
    replicas_needed for `effect` σ, from the pilot's own std(s), reaches 80% power at the true
    std(s) (t_test_power, exact for normal data); and the median count."""
    true = (math.sqrt(2 * (1 - RHO)),) if paired else (1.0, 1.0)
    ok, ns = [], []
    for _ in range(trials):
        a, b = two_sides(rng, pilot, "normal", paired)
        stds = (metrics.sample_std(a - b),) if paired else (metrics.sample_std(a), metrics.sample_std(b))
        n = int(metrics.replicas_needed(effect, stds, pilot=(pilot,) * len(stds)))
        ns.append(n)
        ok.append(metrics.t_test_power(effect, true, n) >= 0.8)
    return float(np.mean(ok)), float(np.median(ns))


# --- tables ----------------------------------------------------------------------------------------

def cell(rate: float, trials: int, extra: str = "") -> str:
    """A rate in percent with its Monte Carlo standard error."""
    return f"{rate:6.1%} ±{math.sqrt(max(rate * (1 - rate), 1e-12) / trials):.1%}{extra}"


def coverage(rng, draw, args: tuple, truth: float, trials: int) -> str:
    hits = nans = 0
    for _ in range(trials):
        lo, hi = draw(rng, *args)
        if math.isnan(lo) or math.isnan(hi):
            nans += 1
        else:
            hits += lo <= truth <= hi
    return cell(hits / trials, trials, f" NaN {nans / trials:.0%}" if nans else "")


def rate(rng, trials: int, event, args: tuple) -> str:
    """Share of trials where event(rng, *args) is true; NaN outcomes (no p-value) are counted apart."""
    out = [event(rng, *args) for _ in range(trials)]
    nans = sum(isinstance(x, float) and math.isnan(x) for x in out)
    hits = sum(bool(x) for x in out if not (isinstance(x, float) and math.isnan(x)))
    return cell(hits / trials, trials, f" NaN {nans / trials:.0%}" if nans else "")


def line(cells: list[str], widths: list[int]) -> str:
    return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header, widths), rule, *(line(r, widths) for r in rows)])


def rejects(rng, p_of, alternative: dict, r: int, kind: str, paired: bool):
    """Whether the test rejects at 0.05 on one simulated experiment; NaN where it gives no p."""
    p = p_of(*two_sides(rng, r, kind, paired, **alternative), paired, kind)
    return p if math.isnan(p) else p < 0.05


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=800, help="simulated experiments per cell")
    parser.add_argument("--quick", action="store_true", help="200 trials a cell (±1.5%%), about 2 minutes")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    trials = 200 if args.quick else args.trials
    rng = np.random.default_rng(args.seed)
    start = time.perf_counter()
    names = [s for s, _, _ in SCENARIOS]

    stats_ = [AccStd(rng), AccStdDist(rng), Share(rng), ChurnShare(rng), Diff(rng),
              *(ProbImprovement(rng, t) for t in THETAS)]
    rows = []
    for s in stats_:
        for r in RS:
            rows.append([s.name, s.method, str(r)] + [
                coverage(rng, s.draw, (r, kind, paired), s.truths[kind], trials)
                if kind in s.kinds and not (s.single and paired and kind != "ties") else "—"
                for _, kind, paired in SCENARIOS])
    print(f"Intervals at 95%: coverage ± Monte Carlo standard error, {trials} simulated experiments per cell\n")
    print(table(["statistic", "method (independent | paired)", "R", *names], rows))

    kinds = ("step noise", "block noise", "replicas")
    rows = [["overhead", "Hodges–Lehmann, signed rank (t < 6)", str(r)]
            + [coverage(rng, overhead, (r, k), 1.2, trials) for k in kinds] for r in RS]
    print(f"\nOverhead (cost_parts, paired by repeat): coverage of the true ratio 1.2, {trials} per cell\n")
    print(table(["statistic", "method", "pairs", *kinds], rows))

    rows = []
    for name, method, p_of, null, alt in (
            ("p", "Welch t | paired t (tied: sign-flip)", p_test, {}, {"delta": 1.0}),
            ("p_vs_control, p_vs_algo", "Brown–Forsythe | sign-flip", p_variance, {}, {"ratio": 4.0}),
            ("tost_p (margin 0.5σ)", "TOST, Welch t | paired t", p_tost, {"delta": 0.5}, {})):
        for r in RS:
            rows.append([name, method, str(r)] + [
                rate(rng, trials, rejects, (p_of, null, r, kind, paired)) + " / "
                + rate(rng, trials, rejects, (p_of, alt, r, kind, paired))
                for _, kind, paired in SCENARIOS])
    for r in RS:
        rows.append(["share_verdict, 5 sources", "Bonett/F | Pitman–Morgan at 1 - 0.05/5", str(r)] + [
            rate(rng, trials, false_source_verdict, (r, kind, paired)) for _, kind, paired in SCENARIOS])
    for r in (5, 10, 20, 50):
        rows.append(["like reference at share 0.5", "Bonett | Pitman–Morgan at 0.95", str(r)] + [
            rate(rng, trials, like_at_edge, (r, kind, paired)) for _, kind, paired in SCENARIOS])
    for r in RS:
        rows.append(["p_adj, 12 compare groups", "Holm over t-tests (tied: sign-flip)", str(r)] + [
            rate(rng, trials, false_compare, (r, kind, paired)) for _, kind, paired in SCENARIOS])
    print(f"\nTests at alpha 0.05, {trials} experiments per cell: size / power (p: a difference of 1σ; p_vs_*: a "
          f"variance ratio of 4; tost_p: sides at the margin / equal), and per table the share of tables with a false "
          f"verdict (share_verdict: below/above reference for sources as noisy as the reference; like reference: "
          f"a source with half the reference's variance read as like it; p_adj: any p_adj < 0.05 with no "
          f"difference)\n")
    print(table(["test", "method (independent | paired)", "R", *names], rows))

    pilots = max(trials // 5, 100)
    print(f"\nreplicas_needed from 5-replica normal pilots (effect 1σ, 80% power, 80% assurance), {pilots} pilots:")
    for paired in (False, True):
        share, median = pilots_reaching_power(rng, pilots, paired)
        print(f"  {'paired t' if paired else 'Welch t '}: {cell(share, pilots)} of pilots reach 80% power "
              f"(median count {median:.0f})")
    print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
