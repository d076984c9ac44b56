"""The sources table: which noise source makes the variance.

For each workload group (every grouping column but `noise`) that ran a reference preset
(`algo+impl`, else `algo`) and some single-source presets (`init`, `order`, `augment`, `impl`,
`bitflip`, and `control` as the floor), one row per preset: its spread as the variance table
states it, and its *share* of the reference's accuracy variance and churn. Summers & Dinneen (2021)
found any one source, even a one-bit change, gives nearly the full variance: shares near 1 say so.

Replica r of every preset uses the same seed for each source that varies (noise.seeds_for), so
when two presets ran the same replicas their runs are paired (`paired` column) and the intervals
use that: correlated seed luck cancels in the ratio. At 3-10 replicas a share's interval is wide
(a ratio of two variances from a few runs each): `share_verdict` says when it cannot tell the
source apart from the reference and `share_replicas` how many replicas per preset would.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pandas as pd

from orchestrator import metrics, noise

REFERENCES = ("algo+impl", "algo")
SINGLE = (*noise.SOURCES, "control")
LIKE_BAND = 2.0  # `like reference`: the share's interval lies inside [1/2, 2] (docs/deciding.md)
# The variance table's own numbers: the std with its interval (metrics.std_ci), the distribution-wise
# part of it (per-example flips removed, Jordan 2023), and churn.
FROM_VARIANCE = ["n_runs", "acc_std", "acc_std_lo", "acc_std_hi", "acc_std_dist", "acc_std_dist_lo",
                 "acc_std_dist_hi", "churn"]
SHARES = ["paired", "share", "share_lo", "share_hi", "share_verdict", "share_replicas", "churn_share",
          "churn_share_lo", "churn_share_hi", "share_lo_adj", "share_hi_adj"]
ALPHA = 0.05  # the error rate of the table's verdicts, together


def family_level(m: int, alpha: float = ALPHA) -> float:
    """The level at which each of a table's m share intervals is taken so that the verdicts read
    from them are all right with probability 1 - alpha (Bonferroni): one 95% interval per row gave
    at least one false `below`/`above reference` in 20.6% of tables at 5 sources. An interval has
    no step-down (Holm) form, and m is small (the sources of a table)."""
    return 1.0 - alpha / max(m, 1)


def _paired(a: pd.DataFrame, b: pd.DataFrame) -> bool:
    """Two presets' ok runs pair up when each ran every replica index once, the same indices."""
    ra, rb = a["replica"], b["replica"]
    return ra.is_unique and rb.is_unique and set(ra) == set(rb)


def share_verdict(reference: bool, share: float, lo: float, hi: float, exact: bool = False) -> str:
    """What a share's interval lets a user say: `reference` (the reference's own row), `none` (the
    preset's replicas have identical weights, `exact`; equal accuracies alone are not enough),
    `below reference` / `above reference` (the interval excludes 1), `like reference` (an
    equivalence statement: the whole interval lies inside [1/LIKE_BAND, LIKE_BAND], the reference's
    variance within a factor of 2; "holds 1 and is narrow" passed a source with half the variance in
    15-49% of groups), and `inconclusive` (it holds 1 but reaches outside the band: this many
    replicas cannot tell a small part of the variance from all of it; a share above 1 is then seed
    luck). `no interval` where none could be given (the note says why)."""
    if reference:
        return "reference"
    if exact:
        return "none"
    if math.isnan(lo) or math.isnan(hi):
        return "no interval"
    if hi < 1:
        return "below reference"
    if lo > 1:
        return "above reference"
    return "like reference" if 1 / LIKE_BAND <= lo and hi <= LIKE_BAND else "inconclusive"


def _shares(name: str, src: pd.DataFrame, ref: pd.DataFrame, reference: str, matrix: Callable,
            level: float) -> tuple[dict, list]:
    """Accuracy-variance and churn shares of `src` over `ref` with their 95% intervals, the share's
    interval at the table's family `level` (`family_level`) and the verdict read from it, and the
    notes that say how each interval was made or why it is missing."""
    src, ref = src.sort_values(["replica", "run_id"]), ref.sort_values(["replica", "run_id"])
    paired = _paired(src, ref)
    acc_s, acc_r = src["test_accuracy"].to_numpy(float), ref["test_accuracy"].to_numpy(float)
    identical = metrics.identical(src["weights_sha256"].tolist())
    ps, pr = matrix("predictions", src.index), matrix("predictions", ref.index)
    # the reference against itself: the same runs, nothing hidden by a tie, share 1 with [1, 1]
    floor = 0.0 if identical or name == reference else metrics.tie_var(ps.shape[1] if ps is not None else 0)
    share, lo, hi = metrics.variance_share_ci(acc_s, acc_r, paired, floor_var=floor)
    _, lo_adj, hi_adj = metrics.variance_share_ci(acc_s, acc_r, paired, level=level, floor_var=floor)
    verdict = share_verdict(name == reference, share, lo_adj, hi_adj, identical and share == 0)
    r = metrics.share_correlation(acc_s, acc_r) if paired else math.nan
    exact = verdict in ("reference", "none")  # [1, 1] or [0, 0] whatever the replica count
    needed = 2.0 if exact else math.nan if verdict == "no interval" else metrics.share_replicas(r, len(src), paired)
    churn = (metrics.churn_share_ci(ps, pr, paired) if ps is not None and pr is not None
             and ps.shape[1] == pr.shape[1] else (math.nan,) * 3)
    notes = ["share: the reference's replicas do not vary"] if np.ptp(acc_r) == 0 else []
    if share == 0 and not identical:
        notes.append("share: accuracies tie at the test set's resolution but weights differ: not exact, "
                     "share_hi is what the tie can hide")
    if not exact and not math.isnan(share):
        if paired:
            method = "Pitman–Morgan interval, paired"
        elif metrics.share_by_bonett(min(len(src), len(ref)), paired, share == 0, level):
            method = "Bonett interval, independent"
        else:
            method = f"F interval, independent (Bonett's, robust to diverged replicas, needs {metrics.ROBUST_MIN})"
        notes.append(f"share: {method}" + (", needs 3 paired replicas" if math.isnan(lo) else ""))
    if verdict == "inconclusive":
        spans = f"x{hi_adj / lo_adj:.3g}" if lo_adj > 0 else "down to 0"
        notes.append(f"share inconclusive at {min(len(src), len(ref))} replicas (interval spans {spans}); "
                     f"about {needed:.0f} per preset would pin it within x2 either way")
    if name != reference and churn[0] > 0:
        notes.append("churn_share: jackknife over replicas" + (", needs 3 a preset" if math.isnan(churn[1]) else ""))
    return dict(zip(SHARES, (paired, share, lo, hi, verdict, needed, *churn, lo_adj, hi_adj))), notes


def sources_table(variance: pd.DataFrame, meta: pd.DataFrame, matrix: Callable, by: list[str]) -> pd.DataFrame:
    """One row per (workload group, preset in SINGLE or the reference) where the group has a
    reference preset with at least two ok runs.

    `variance` is the variance table of the same `meta` and `by`, one row per group of
    meta.groupby(by, dropna=False, sort=True) in that order: its spreads are copied, so both
    tables state the same numbers. `matrix(column, rows)` gives a list column as an (R, L) array.
    """
    columns = [c for c in by if c != "noise"] + ["reference", "source", *FROM_VARIANCE, *SHARES, "note"]
    rest = [c for c in by if c != "noise"]
    jobs = []  # (key, reference, name, its runs, the reference's runs, its variance-table row)
    if "noise" in by and len(meta):
        group_row = meta.groupby(by, dropna=False, sort=True).ngroup()
        ok = meta[(meta["status"] == "ok") & meta["test_accuracy"].notna()]
        for vals, g in (ok.groupby(rest, dropna=False, sort=True) if rest else [((), ok)]):
            key = dict(zip(rest, vals if isinstance(vals, tuple) else (vals,)))
            presets = dict(tuple(g.groupby("noise", sort=False)))
            reference = next((r for r in REFERENCES if len(presets.get(r, ())) >= 2), None)
            if reference is None or not set(SINGLE) & set(presets):
                continue
            jobs += [(key, reference, name, presets[name], presets[reference],
                      variance.iloc[group_row[presets[name].index[0]]])
                     for name in (n for n in (*SINGLE, reference) if n in presets)]
    # the family: every row whose verdict an interval decides (not the reference, not identical weights)
    level = family_level(sum(name != reference and not metrics.identical(runs["weights_sha256"].tolist())
                             for _, reference, name, runs, _, _ in jobs))
    rows = []
    for key, reference, name, runs, ref_runs, v in jobs:
        shares, notes = _shares(name, runs, ref_runs, reference, matrix, level)
        rows.append({**key, "reference": reference, "source": name, **{c: v[c] for c in FROM_VARIANCE},
                     **shares, "note": "; ".join([n for n in (v["note"],) if n] + notes)})
    table = pd.DataFrame(rows, columns=columns)
    table["share_replicas"] = table["share_replicas"].astype(np.float64)
    table.attrs["message"] = ("no workload group ran a reference preset (algo+impl or algo) with 2 ok runs "
                              "beside single-source presets; add noise: [init, order, augment, impl, bitflip, "
                              "algo+impl] to a sweep to fill this table")
    return table
