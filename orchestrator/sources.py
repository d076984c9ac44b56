"""The sources table: which noise source makes the variance.

For each workload group (every grouping column but `noise`) that ran a reference preset
(`algo+impl`, else `algo`) and some single-source presets (`init`, `order`, `augment`, `impl`,
`bitflip`, and `control` as the floor), one row per preset: its spread as the variance table
states it, and its *share* of the reference's accuracy variance and churn. Summers & Dinneen (2021)
found any one source, even a one-bit change, gives nearly the full variance: shares near 1 say so.

Replica r of every preset uses the same seed for each source that varies (noise.seeds_for), so
when two presets ran the same replicas their runs are paired and the share's bootstrap resamples
replicas jointly (`paired` column): correlated seed luck cancels in the ratio.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd

from orchestrator import metrics, noise

REFERENCES = ("algo+impl", "algo")
SINGLE = (*noise.SOURCES, "control")
# The variance table's own numbers: the std with its chi-square interval, the distribution-wise
# part of it (per-example flips removed, Jordan 2023), and churn.
FROM_VARIANCE = ["n_runs", "acc_std", "acc_std_lo", "acc_std_hi", "acc_std_dist", "acc_std_dist_lo",
                 "acc_std_dist_hi", "churn"]
SHARES = ["paired", "share", "share_lo", "share_hi", "churn_share", "churn_share_lo", "churn_share_hi"]


def _paired(a: pd.DataFrame, b: pd.DataFrame) -> bool:
    """Two presets' ok runs pair up when each ran every replica index once, the same indices."""
    ra, rb = a["replica"], b["replica"]
    return ra.is_unique and rb.is_unique and set(ra) == set(rb)


def _shares(src: pd.DataFrame, ref: pd.DataFrame, matrix: Callable, seed: int) -> dict:
    """Accuracy-variance and churn shares of `src` over `ref` with their bootstrap intervals."""
    src, ref = src.sort_values("replica"), ref.sort_values("replica")
    paired = _paired(src, ref)
    share = metrics.variance_share_ci(src["test_accuracy"].to_numpy(float), ref["test_accuracy"].to_numpy(float),
                                      seed, paired)
    ps, pr = matrix("predictions", src.index), matrix("predictions", ref.index)
    churn = (metrics.churn_share_ci(ps, pr, seed, paired) if ps is not None and pr is not None
             and ps.shape[1] == pr.shape[1] else (np.nan,) * 3)
    return dict(zip(SHARES, (paired, *share, *churn)))


def sources_table(variance: pd.DataFrame, meta: pd.DataFrame, matrix: Callable, by: list[str],
                  seed_of: Callable[[dict], int]) -> pd.DataFrame:
    """One row per (workload group, preset in SINGLE or the reference) where the group has a
    reference preset with at least two ok runs.

    `variance` is the variance table of the same `meta` and `by`, one row per group of
    meta.groupby(by, dropna=False, sort=True) in that order: its spreads are copied, so both
    tables state the same numbers. `matrix(column, rows)` gives a list column as an (R, L) array;
    `seed_of(key)` seeds a row's bootstrap.
    """
    columns = [c for c in by if c != "noise"] + ["reference", "source", *FROM_VARIANCE, *SHARES, "note"]
    rest = [c for c in by if c != "noise"]
    rows = []
    if "noise" in by and len(meta):
        group_row = meta.groupby(by, dropna=False, sort=True).ngroup()
        ok = meta[(meta["status"] == "ok") & meta["test_accuracy"].notna()]
        for vals, g in (ok.groupby(rest, dropna=False, sort=True) if rest else [((), ok)]):
            key = dict(zip(rest, vals if isinstance(vals, tuple) else (vals,)))
            presets = dict(tuple(g.groupby("noise", sort=False)))
            reference = next((r for r in REFERENCES if len(presets.get(r, ())) >= 2), None)
            if reference is None or not set(SINGLE) & set(presets):
                continue
            for name in (n for n in (*SINGLE, reference) if n in presets):
                runs = presets[name]
                v = variance.iloc[group_row[runs.index[0]]]
                rows.append({**key, "reference": reference, "source": name,
                             **{c: v[c] for c in FROM_VARIANCE},
                             **_shares(runs, presets[reference], matrix, seed_of({**key, "source": name})),
                             "note": v["note"]})
    table = pd.DataFrame(rows, columns=columns)
    table.attrs["message"] = ("no workload group ran a reference preset (algo+impl or algo) with 2 ok runs "
                              "beside single-source presets; add noise: [init, order, augment, impl, bitflip, "
                              "algo+impl] to a sweep to fill this table")
    return table
