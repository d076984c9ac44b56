"""Figures and an HTML report of a results tree: the same plots the notebook shows, readable without Jupyter.

    python -m orchestrator.report OUT   # computes the tables, writes OUT/tables/report.html

Data flows one way: the run rows come from the reducer's one reader (`reduce.load_runs`, a
`reduce.Runs`) and the tables from `reduce.reduce`; the reducer never imports this module. Each
plotting function takes the runs or a reducer table and returns a matplotlib
Figure built with the object-oriented API (no pyplot, so no global figure state and no backend
switch in a notebook kernel; PNGs are rendered by Agg). A figure whose data is absent says so in the
figure itself instead of raising, so a notebook cell or report section always has an image.
`notebooks/inspect_results.ipynb` imports these functions: one source of truth for every plot.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import html
import io
import json
import math
import sys

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from orchestrator import metrics, reduce, store
from orchestrator.noise import PRESETS

NONE = "none in this results tree"
# Grouping keys of the variance table; a figure names a group by the keys that differ between groups.
KEYS = list(reduce.DEFAULT_BY)
PANEL = ["arch", "dataset"]  # one panel per workload family: class counts and accuracy scales differ
FINGERPRINT = ["fingerprint_id", "accelerator", "gpu_name", "gpu_count", "gpu_capability", "gpu_driver",
               "cuda_version", "cudnn_version", "torch_version", "torchvision_version", "ray_version",
               "python_version", "cpu_model", "cpu_capability", "instance_type"]
COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
          "#bcbd22", "#17becf"]
N_WORST = 3  # classes named per group in the per-class figure
OUTSIDE = {"loc": "upper left", "bbox_to_anchor": (1.01, 1), "borderaxespad": 0}  # legends beside the data
COLUMNS = [*FINGERPRINT, "sweep", "hostname", "error"]  # run columns read beyond the reducer's own


# --- loading ----------------------------------------------------------------------------------

def load_runs(out_uri: str) -> reduce.Runs:
    """The run rows the figures and tables here need, read by the reducer's reader
    (`reduce.load_runs`) with the fingerprint columns added; predictions stay unread."""
    return reduce.load_runs(out_uri, COLUMNS, lists=["per_class_accuracy"])


def load_tables(out_uri: str, by: list[str] | None = None) -> dict[str, pd.DataFrame]:
    """The reducer's tables computed afresh and in memory (nothing is written under OUT/tables)."""
    return reduce.reduce(out_uri, by=by, fmt=())


def load_progress(out_uri: str) -> dict | None:
    """OUT/progress.json as the sweep last wrote it, or None."""
    fs, root = store.resolve(out_uri)
    path = f"{root}/progress.json"
    if not store.exists(fs, path):
        return None
    try:
        return json.loads(store.read_bytes(fs, path))
    except (json.JSONDecodeError, OSError):
        return None


# --- helpers ----------------------------------------------------------------------------------

def _noise_order(values) -> list[str]:
    """Presets in the study's order (control, algo, impl, algo+impl, ...), then custom sets by name."""
    present = {str(v) for v in values}
    return [p for p in PRESETS if p in present] + sorted(present - set(PRESETS))


def _fmt(v: object) -> str:
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return str(int(v))
    return str(v)


def _labels(df: pd.DataFrame, keys: list[str]) -> pd.Series:
    """A short name per row from the keys whose values differ between rows ("" when none do)."""
    varying = [k for k in keys if k in df and df[k].astype(str).nunique() > 1]

    def name(row: pd.Series) -> str:
        return ", ".join(_fmt(v) if k in PANEL + ["noise"] else f"{k}={_fmt(v)}" for k, v in row.items())
    return df[varying].apply(name, axis=1) if varying else pd.Series("", index=df.index)


def _panels(df: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    if df.empty:
        return []
    return [(f"{a} · {d}", g) for (a, d), g in df.groupby(PANEL, sort=True, dropna=False)]


def _empty(title: str, message: str, size=(8, 1.4)) -> Figure:
    """A figure that says why there is nothing to plot."""
    fig = Figure(figsize=size, layout="constrained")
    ax = fig.add_subplot()
    ax.set_axis_off()
    ax.set_title(title, loc="left")
    ax.text(0.5, 0.45, message, ha="center", va="center", wrap=True, fontsize=12, color="#555",
            transform=ax.transAxes)
    return fig


def _grid(n: int, width: float = 6.0, height: float = 4.0, ncols: int = 2) -> tuple[Figure, list]:
    cols = min(n, ncols)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(max(width * cols, 8), height * rows), layout="constrained")
    return fig, [fig.add_subplot(rows, cols, i + 1) for i in range(n)]


def _slots(n_series: int, width: float = 0.8) -> np.ndarray:
    """x offsets of n side-by-side series within one category slot of the given width."""
    return (np.arange(n_series) - (n_series - 1) / 2) * (width / max(n_series, 1))


# --- figures ----------------------------------------------------------------------------------

def accuracy_by_noise(runs: reduce.Runs) -> Figure:
    """Test accuracy of every ok replica (one dot each) per noise preset, one colour per tooling
    group, with the group mean (bar) and sample std printed under it. One panel per arch · dataset."""
    title = "Test accuracy per replica"
    ok = runs.meta[runs.meta["status"] == "ok"].dropna(subset=["test_accuracy"])
    if ok.empty:
        return _empty(title, f"no ok runs: {NONE}")
    panels = _panels(ok)
    fig, axes = _grid(len(panels))
    for ax, (name, g) in zip(axes, panels):
        series = _labels(g, [k for k in KEYS if k not in PANEL + ["noise"]])
        names, noises = sorted(series.unique()), _noise_order(g["noise"].unique())
        offsets, w = _slots(len(names)), 0.8 / max(len(names), 1)
        labelled = set()
        for si, s in enumerate(names):
            for ni, noise in enumerate(noises):
                acc = g.loc[(series == s) & (g["noise"] == noise)].sort_values("replica")["test_accuracy"]
                if acc.empty:
                    continue
                x0 = ni + offsets[si]
                # deterministic spread by replica rank: identical accuracies show as a flat row of dots
                xs = x0 + (np.linspace(-0.3, 0.3, len(acc)) if len(acc) > 1 else np.zeros(1)) * w
                ax.scatter(xs, acc, s=22, color=COLORS[si % len(COLORS)], alpha=0.8, zorder=3,
                           label=None if s in labelled else s or None)
                labelled.add(s)
                ax.hlines(acc.mean(), x0 - 0.4 * w, x0 + 0.4 * w, color="black", lw=1.5, zorder=4)
                sd = f"{metrics.sample_std(acc):.3g}" if len(acc) > 1 else "n/a"  # equal values: exactly 0
                ax.annotate(f"n={len(acc)}\nsd={sd}", (x0, 0), xycoords=("data", "axes fraction"),
                            xytext=(0, 3), textcoords="offset points", ha="center", va="bottom", fontsize=7,
                            color="#444")
        ax.set_xticks(range(len(noises)), noises)
        ax.set_xlim(-0.6, len(noises) - 0.4)
        lo, hi = g["test_accuracy"].min(), g["test_accuracy"].max()
        pad = max(hi - lo, 0.01)
        ax.set_ylim(lo - 0.45 * pad, hi + 0.15 * pad)  # room at the bottom for the n / sd labels
        ax.set_xlabel("noise preset")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"{title}: {name}", loc="left")
        ax.grid(axis="y", alpha=0.3)
        if any(names):
            ax.legend(fontsize=8, **OUTSIDE)
    return fig


def _bars(ax, table: pd.DataFrame, value: str, series: pd.Series, noises: list[str], fmt: str) -> None:
    names = sorted(series.unique())
    offsets, w = _slots(len(names)), 0.8 / max(len(names), 1)
    labelled = set()
    for si, s in enumerate(names):
        for ni, noise in enumerate(noises):
            v = table.loc[(series == s) & (table["noise"] == noise), value]
            if v.empty:
                continue
            y = float(v.iloc[0])
            x = ni + offsets[si]
            ax.bar(x, 0 if math.isnan(y) else y, w * 0.9, color=COLORS[si % len(COLORS)],
                   label=None if s in labelled else s or None)
            labelled.add(s)
            ax.annotate("n/a" if math.isnan(y) else format(y, fmt), (x, 0 if math.isnan(y) else y),
                        xytext=(0, 2), textcoords="offset points", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(noises)), noises)
    ax.set_xlabel("noise preset")
    ax.grid(axis="y", alpha=0.3)
    ax.margins(y=0.15)


def churn_l2_by_noise(variance: pd.DataFrame) -> Figure:
    """Churn (share of test examples on which two replicas disagree, mean over pairs) and the mean
    pairwise L2 distance of final weights, per noise preset and group, from the variance table."""
    title = "Prediction churn and weight distance between replicas"
    if variance.empty:
        return _empty(title, variance.attrs.get("message", NONE) + f" ({NONE})")
    if "noise" not in variance:
        return _empty(title, "the variance table is not grouped by noise (--by without noise)")
    series = _labels(variance, [k for k in variance.columns if k in KEYS and k != "noise"])
    noises = _noise_order(variance["noise"].unique())
    fig = Figure(figsize=(12, 4.2), layout="constrained")
    axes = fig.subplots(1, 2)
    _bars(axes[0], variance, "churn", series, noises, ".3f")
    axes[0].set_ylabel("churn (fraction of test examples)")
    axes[0].set_title("churn: predictions that differ", loc="left")
    _bars(axes[1], variance, "l2", series, noises, ".3g")
    axes[1].set_ylabel("L2 distance of final weights")
    axes[1].set_title("L2: how far apart the weights end", loc="left")
    if any(series):
        axes[1].legend(fontsize=8, **OUTSIDE)
    fig.suptitle(title, x=0.01, ha="left")
    return fig


SHARE_SCALE = 1.0  # symlog: linear from 0 to 1, where most shares lie, logarithmic above
SHARE_TICKS = (0, 0.25, 0.5, 0.75, 1, 2, 5, 10, 100, 1000, 10 ** 4, 10 ** 5, 10 ** 6)


def source_shares(sources: pd.DataFrame) -> Figure:
    """Share of the reference preset's accuracy variance and churn per noise source: a dot at the
    share and a whisker over its 95% interval, 1 (dashed) being the reference itself. The axis is
    linear from 0 to 1 and logarithmic above, so that shares of 0.2 and 0.5 stay apart while an
    interval reaching 60 still fits. A share without an interval is a hollow dot labelled `no
    interval` (not a dot without whiskers, which would look certain); each row ends with its
    verdict (`inconclusive` with the replicas per preset that would settle it). One panel per
    workload group of the sources table."""
    title = "Which source makes the variance: share of the reference's variance and churn"
    if sources.empty:
        return _empty(title, sources.attrs.get("message", NONE) + f" ({NONE})", size=(8, 1.8))
    keys = [k for k in sources.columns if k in KEYS]
    groups = list(sources.groupby(keys, sort=True, dropna=False)) if keys else [((), sources)]
    names = _labels(sources, keys)
    fig, axes = _grid(len(groups), width=7.5, height=0.55 * sources["source"].nunique() + 1.8, ncols=1)
    for ax, (_, g) in zip(axes, groups):
        y = np.arange(len(g))
        for off, (col, label, color) in zip((-0.16, 0.16), (("share", "accuracy variance", COLORS[0]),
                                                            ("churn_share", "churn", COLORS[1]))):
            v, lo, hi = (g[c].to_numpy(float) for c in (col, f"{col}_lo", f"{col}_hi"))
            known = np.isfinite(lo) & np.isfinite(hi)
            ax.errorbar(v[known], y[known] + off, xerr=np.abs(np.vstack([v - lo, hi - v])[:, known]), fmt="o",
                        color=color, ms=5, capsize=3, label=label)
            bare = ~known & np.isfinite(v)
            if bare.any():
                ax.plot(v[bare], y[bare] + off, "o", mfc="white", color=color, ms=5)
            for yi, vi in zip(y[bare] + off, v[bare]):
                ax.annotate("no interval", (vi, yi), xytext=(6, 0), textcoords="offset points", va="center",
                            fontsize=7, color=color)
        for yi, (verdict, needed) in zip(y, zip(g["share_verdict"], g["share_replicas"])):
            text = f"inconclusive: ~{needed:.0f} replicas/preset" if verdict == "inconclusive" else verdict
            ax.annotate(text, (1.0, yi), xycoords=("axes fraction", "data"), xytext=(6, 0),
                        textcoords="offset points", va="center", fontsize=8,
                        color="#b00" if verdict == "inconclusive" else "#444")
        reference = g["reference"].iloc[0]
        ax.axvline(1.0, color="#555", ls="--", lw=1)
        ax.annotate(f"{reference} = 1", (1.0, 1.0), xycoords=("data", "axes fraction"), xytext=(3, -2),
                    textcoords="offset points", va="top", fontsize=7, color="#555")
        ax.set_xscale("symlog", linthresh=SHARE_SCALE, linscale=2.0)
        right = 1.3 * np.nanmax(g[["share_hi", "churn_share_hi", "share", "churn_share"]].to_numpy(float),
                                initial=2.0 / 1.3)
        ax.set_xlim(-0.03, right)  # a share of exactly 0 (identical replicas) shows as a whole dot
        ax.set_xticks([t for t in SHARE_TICKS if t <= right])
        ax.xaxis.set_major_formatter(lambda x, _: f"{x:g}")
        ax.set_yticks(y, [f"{s} (n={n})" for s, n in zip(g["source"], g["n_runs"])])
        ax.set_ylim(len(g) - 0.5, -0.5)
        ax.set_xlabel(f"share of {reference} (linear to 1, logarithmic above)")
        ax.set_title(names[g.index[0]] or "all runs", loc="left", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower left", ncols=2, fontsize=8)
    fig.suptitle(title, x=0.01, ha="left")
    return fig


def load_written(out_uri: str, name: str) -> pd.DataFrame | None:
    """OUT/tables/<name>.parquet as a command (compare, diverge) last wrote it, or None."""
    fs, root = store.resolve(out_uri)
    path = f"{root}/tables/{name}.parquet"
    return pd.read_parquet(path, filesystem=fs) if store.exists(fs, path) else None


def load_compare(out_uri: str) -> pd.DataFrame | None:
    """OUT/tables/compare.parquet as `python -m orchestrator.compare` last wrote it, or None (the notebook's)."""
    return load_written(out_uri, "compare")


def divergence_lines(divergence: pd.DataFrame) -> Figure:
    """Distance between same-setting runs' weights (their sketches) against epoch, one line per group
    (a pair of runs of one setting differs only by its seeds), one panel per workload family."""
    title = "How far apart runs of one setting grow, epoch by epoch"
    if divergence.empty:
        return _empty(title, divergence.attrs.get("message", NONE))
    panels = _panels(divergence)
    fig, axes = _grid(len(panels))
    for ax, (name, df) in zip(axes, panels):
        series = _labels(df, [k for k in df.columns if k in KEYS])
        for label, g in df.groupby(series, sort=True):
            ax.plot(g["epoch"], g["distance"], marker="o", label=label or "all runs")
        ax.set_yscale("symlog", linthresh=1e-6)
        ax.set_xlabel("epoch")
        ax.set_ylabel("mean distance of weight sketches")
        ax.set_title(name, loc="left")
        ax.legend(fontsize=8, **OUTSIDE)
    fig.suptitle(title, x=0.01, ha="left")
    return fig


def class_std_table(runs: reduce.Runs) -> pd.DataFrame:
    """Across-replica std of each class's accuracy per group (the variance table's grouping), one
    row per (group, class): the numbers behind per_class_std_max / worst_class."""
    ok = runs.meta[runs.meta["status"] == "ok"]
    rows = []
    for vals, g in (ok.groupby(KEYS, sort=True, dropna=False) if len(ok) else ()):
        per_class = runs.matrix("per_class_accuracy", g.index)
        if len(g) < 2 or per_class is None:
            continue
        rows += [{**dict(zip(KEYS, vals)), "n_runs": len(g), "class": c, "std": s}
                 for c, s in enumerate(metrics.column_std(per_class))]
    return pd.DataFrame(rows, columns=[*KEYS, "n_runs", "class", "std"])


def per_class_std(runs: reduce.Runs) -> Figure:
    """Bars of each class's across-replica accuracy std, one colour per group (noise preset and
    tooling); the legend names each group's worst classes. Top-1 accuracy averages these swings away."""
    title = "Per-class accuracy std across replicas"
    table = class_std_table(runs)
    if table.empty:
        return _empty(title, f"no group has 2 ok runs with per-class accuracies: {NONE}")
    panels = _panels(table)
    fig, axes = _grid(len(panels), width=12, height=4.2, ncols=1)
    for ax, (name, t) in zip(axes, panels):
        others = _labels(t, [k for k in KEYS if k in t and k not in PANEL + ["noise"]])
        t = t.assign(_s=t["noise"].astype(str) + others.map(lambda o: f", {o}" if o else ""))
        t["_n"] = t["noise"].map({n: i for i, n in enumerate(_noise_order(t["noise"].unique()))})
        groups = [g for _, g in sorted(t.groupby("_s"), key=lambda kv: (kv[1]["_n"].iloc[0], kv[0]))]
        n_classes = int(t["class"].max()) + 1
        offsets, w = _slots(len(groups)), 0.8 / len(groups)
        tops = {}  # worst class of any group -> height of its tallest bar, labelled once
        for i, g in enumerate(groups):
            g = g.sort_values("class")
            worst = g[g["std"] > 0].nlargest(N_WORST, "std")
            named = ", ".join(f"{int(c)} ({s:.2f})" for c, s in zip(worst["class"], worst["std"]))
            label = f"{g['_s'].iloc[0]} (n={g['n_runs'].iloc[0]}): " + (
                f"worst {named}" if named else "every class identical")
            ax.bar(g["class"] + offsets[i], g["std"], w * 0.9, color=COLORS[i % len(COLORS)], label=label)
            if len(worst):
                c = int(worst["class"].iloc[0])
                tops[c] = max(tops.get(c, 0.0), float(worst["std"].iloc[0]))
        for c, top in tops.items():
            ax.annotate(f"class {c}", (c, top), xytext=(0, 2), textcoords="offset points",
                        ha="center", va="bottom", fontsize=8, fontweight="bold")
        if n_classes <= 30:  # beyond that (CIFAR-100) matplotlib's own ticks stay readable
            ax.set_xticks(range(n_classes))
        ax.set_xlabel("class")
        ax.set_ylabel("std of class accuracy")
        ax.set_title(f"{title}: {name}", loc="left")
        ax.grid(axis="y", alpha=0.3)
        ax.margins(y=0.15)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(0, -0.14), ncols=2, borderaxespad=0)
    return fig


def overhead_bars(overhead: pd.DataFrame) -> Figure:
    """Cost of deterministic mode per accelerator and workload (arch, plus the settings, tooling
    values and method that tell the overhead table's rows of one arch apart): median step (or
    epoch) time in it over the default's, minus 1, in percent, with the interval over repeats
    (overhead_lo..overhead_hi) as error bars and the kernels and fill parts under the label."""
    title = "Cost of determinism: step-time overhead of deterministic mode"
    ok = overhead.dropna(subset=["overhead_pct"]) if len(overhead) and "overhead_pct" in overhead else overhead
    if ok.empty:
        return _empty(title, f"no overhead probes: {NONE} (add an `overhead:` section to the sweep)")
    accels = sorted(ok["accelerator"].astype(str).unique())
    others = _labels(ok, ["workload", *reduce.PROBE_TOOLING, "method"])
    series = ok["arch"].astype(str) + others.map(lambda o: f", {o}" if o else "")
    names = sorted(series.unique())
    slot = min(0.8, 0.3 * len(names))  # a lone bar stays narrow
    offsets, w = _slots(len(names), slot), slot / len(names)
    fig = Figure(figsize=(min(14, 5 + 1.5 * len(accels) * len(names) ** 0.5), 4.2), layout="constrained")
    ax = fig.add_subplot()
    for i, name in enumerate(names):
        g = ok[series == name]
        x = np.array([accels.index(a) for a in g["accelerator"].astype(str)]) + offsets[i]
        pct = g["overhead_pct"].to_numpy(float)
        lo = np.nan_to_num(pct - g["overhead_lo"].to_numpy(float), nan=0).clip(min=0)
        hi = np.nan_to_num(g["overhead_hi"].to_numpy(float) - pct, nan=0).clip(min=0)
        ax.bar(x, pct, w * 0.9, yerr=[lo, hi], capsize=4, color=COLORS[i % len(COLORS)], label=name)
        for xi, p, low, high, parts in zip(x, pct, g["overhead_lo"].to_numpy(float), g["overhead_hi"].to_numpy(float),
                                           _parts_text(g)):
            ci = f"[{low:+.0f}, {high:+.0f}]" if np.isfinite([low, high]).all() else "no interval"
            ax.annotate(f"{p:+.0f}%\n{ci}{parts}", (xi, max(p, 0 if math.isnan(high) else high)),
                        xytext=(0, 3), textcoords="offset points", ha="center", va="bottom", fontsize=8)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(accels)), accels)
    ax.set_xlim(-0.6, len(accels) - 0.4)
    ax.set_xlabel("accelerator")
    ax.set_ylabel("overhead of deterministic mode (%)")
    ax.set_title(title, loc="left")
    ax.grid(axis="y", alpha=0.3)
    ax.margins(y=0.2)
    ax.legend(fontsize=8, title="workload", **OUTSIDE)
    return fig


def _parts_text(overhead: pd.DataFrame) -> list[str]:
    """Per overhead row, its kernels and fill parts as a second label line ("" where NaN: replica rows,
    probes older than the parts)."""
    parts = [overhead.get(f"overhead_{p}_pct", pd.Series(np.nan, overhead.index)).to_numpy(float)
             for p in ("kernels", "fill")]
    return [f"\nkernels {k:+.0f}, fill {f:+.0f}" if np.isfinite([k, f]).all() else "" for k, f in zip(*parts)]


def overhead_ops_bars(ops: pd.DataFrame) -> Figure:
    """Which ops deterministic mode slows: per probe group (one panel each), the ops whose self time
    per step grows most (the `overhead_ops` table), nondet and det side by side, with the ops that
    had no deterministic kernel named under the panel title."""
    title = "Which ops deterministic mode slows: self time per step"
    if ops.empty:
        return _empty(title, f"no profiled probes: {NONE} (add an `overhead:` section to the sweep)")
    keys = [c for c in ops.columns if c not in reduce.OVERHEAD_OPS]
    groups = list(ops.groupby(keys, sort=True, dropna=False))
    heads = pd.DataFrame([dict(zip(keys, vals)) for vals, _ in groups])
    names = heads["arch"].astype(str) + _labels(heads, [k for k in keys if k != "arch"]).map(
        lambda o: f", {o}" if o else "")  # the arch and the keys that tell the panels apart
    fig, axes = _grid(len(groups), width=7.0, height=0.45 * max(len(g) for _, g in groups) + 1.6)
    for ax, name, (_, g) in zip(axes, names, groups):
        g = g.iloc[::-1]  # the op that grows most on top
        y = np.arange(len(g))
        for dy, mode, color in ((0.2, "nondet", COLORS[0]), (-0.2, "det", COLORS[3])):
            ax.barh(y + dy, g[f"ms_{mode}"].to_numpy(float), 0.4, color=color, label=mode)
        for yi, det, delta in zip(y, g["ms_det"].to_numpy(float), g["delta_ms"].to_numpy(float)):
            ax.annotate(f"{delta:+.2g}", (det, yi - 0.2), xytext=(3, 0), textcoords="offset points", va="center",
                        fontsize=7)
        ax.set_yticks(y, g["op"].astype(str).str.slice(0, 48), fontsize=8)
        clock = ", ".join(sorted(g["clock"].astype(str).unique()))
        ax.set_xlabel(f"self time per step (ms, {clock})")
        missing = g["nondeterministic_ops"].fillna("").iloc[0]  # the group's, on each of its rows
        ax.set_title(f"{name}\n{'no deterministic kernel: ' + missing if missing else ''}", loc="left", fontsize=9)
        ax.margins(x=0.15)
        ax.grid(axis="x", alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(title, x=0.01, ha="left")
    return fig


# --- tables -----------------------------------------------------------------------------------

def _joined(values: pd.Series) -> str:
    return ", ".join(sorted({_fmt(v) for v in values.dropna()}))


def fingerprints(runs: reduce.Runs) -> pd.DataFrame:
    """One row per hardware + software stack the runs used, side by side: how many runs, which of
    the sweep's stacks and thread counts ran on it; columns nothing filled in (no GPU on any host)
    are left out."""
    ok = runs.meta.dropna(subset=["fingerprint_id"])
    cols = [c for c in FINGERPRINT if c in ok]
    if ok.empty:
        out = pd.DataFrame(columns=[*cols, "n_runs", "stack", "num_threads", "hosts"])
    else:
        out = ok.groupby("fingerprint_id", sort=True).agg(
            **{c: (c, "first") for c in cols if c != "fingerprint_id"},
            n_runs=("run_id", "size"), stack=("stack", _joined), num_threads=("num_threads", _joined),
            hosts=("hostname", "nunique")).reset_index()
        out = out[[c for c in out if out[c].notna().any() and (out[c].astype(str) != "").any()]]
    out.attrs["message"] = "no run recorded a fingerprint"
    return out


def compact(df: pd.DataFrame) -> pd.DataFrame:
    """The table without grouping columns that hold one value in every row and without columns
    with no value at all; what was left out is in attrs['constant'] and attrs['empty']."""
    if df.empty:
        return df
    keys = set(KEYS) | {c for c in df if c.endswith(("_a", "_b"))}
    constant = {c: _fmt(df[c].iloc[0]) for c in df if c in keys and len(df) > 1
                and df[c].astype(str).nunique() == 1}
    empty = [c for c in df if c not in constant and (df[c].isna() | (df[c].astype(str) == "")).all()]
    out = df.drop(columns=[*constant, *empty])
    out.attrs = {**df.attrs, "constant": constant, "empty": empty}
    return out


def table_html(df: pd.DataFrame, message: str | None = None) -> str:
    """A table as HTML (4 significant digits, compacted), or a note saying why it is empty."""
    if df.empty:
        why = message or df.attrs.get("message", "")
        return f'<p class="none">{NONE}{": " + html.escape(why) if why else ""}</p>'
    c = compact(df)
    notes = []
    if c.attrs.get("constant"):
        notes.append("same in every row: " + ", ".join(f"{k}={v}" for k, v in c.attrs["constant"].items()))
    if c.attrs.get("empty"):
        notes.append("no values: " + ", ".join(c.attrs["empty"]))
    body = c.to_html(index=False, na_rep="", border=0, classes="t",
                     float_format=lambda v: f"{v:.4g}", justify="left")
    note = "".join(f'<p class="note">{html.escape(n)}</p>' for n in notes)
    return f'{note}<div class="scroll">{body}</div>'


# --- the report -------------------------------------------------------------------------------

GUIDE = {
    "accuracy": "One dot per replica. A flat row of dots at one height means the replicas are bitwise "
                "the same model (expected for control on a CPU); the spread of algo is the run-to-run "
                "variance a single reported number hides. The black bar is the mean; n and the sample "
                "std are printed under each group.",
    "churn": "Churn is the share of test examples on which two replicas predict different classes "
             "(mean over replica pairs; disagreement, not the reference code's agreement). L2 is the "
             "mean pairwise distance of the final weights. Both can be large while top-1 accuracy barely moves.",
    "per_class": "The std across replicas of each class's accuracy. Top-1 accuracy averages these swings "
                 "away; the legend names each group's worst classes with their std, and each group's "
                 "worst class is labelled above its bars.",
    "cross_stack": "Runs with the same seeds and settings that ran on a different stack (thread count, "
                   "accelerator, software fingerprint), compared pair by pair. identical_fraction < 1 or "
                   "churn > 0 here is noise that no seed removes.",
    "overhead": "Training-step time in torch's deterministic mode over the default's, minus 1, per "
                "accelerator and workload, in percent (Hodges–Lehmann over repeats of blocks); error bars are "
                "the 95% signed-rank interval over repeats (t below 6, none below 2). Probe rows are measured "
                "side by side in one probe per (workload, "
                "tooling, accelerator) and split into the deterministic kernels' part and the NaN fill's "
                "(they add up to the total); replicas rows come from control vs impl replicas' epoch times, "
                "separate runs, so noisier and not split.",
    "overhead_ops": "From one profiled deterministic and one default block per probe: the ops whose self time "
                    "per step grows most in deterministic mode (aten::fill_ is the NaN fill of new tensors), "
                    "and, in each panel's title, the ops that had no deterministic kernel at all.",
    "sources": "Each single-source preset's accuracy variance (blue) and churn (orange) as a share of the "
               "reference preset's (algo+impl, else algo), with 95% intervals (variance: F, or Pitman–Morgan "
               "where presets ran the same replicas and so share seeds; churn: jackknife over replicas). The axis "
               "is linear from 0 to 1 and logarithmic above. A share near 1 means that source alone gives nearly "
               "all the variance; control and, on a CPU, impl are exact zeros. At 3-10 replicas a variance share "
               "is rarely pinned down: `inconclusive` rows give the replicas per preset that would pin it within "
               "x2, and a share above 1 whose interval reaches below 1 is seed luck, not a source that adds "
               "more than all sources together.",
    "compare": "The last `python -m orchestrator.compare` of this tree: mean difference A - B with its t "
               "interval (paired t where the sides ran the same replicas, Welch otherwise: the `test` column), "
               "that test's p, P(A > B) with a score interval, the replicas per side the same test needs for 80% "
               "power at alpha 0.05, and with --margin an equivalence verdict (TOST).",
    "divergence": "Per epoch, the share of pairs of runs of one setting whose weights are still bitwise identical "
                  "and the mean distance between their weight sketches (a fixed random projection, the same for "
                  "every run of a workload, that estimates the L2 distance). first_parting_epoch is the first "
                  "epoch at which a pair differs; a line at 0 is a setting whose runs never part (control).",
    "diverge": "The last `python -m orchestrator.diverge` of this tree: the first aten op at which the two "
               "replayed runs part (step, phase, module), its relative size, and how many later ops differ "
               "(docs/diverge.md says how to read it).",
    "variance": "The full variance table: one row per group. Columns that are the same in every row "
                "are listed above it rather than repeated.",
    "subgroups": "Accuracy, false-positive and false-negative rates per subgroup, for datasets that define them.",
    "fingerprints": "Every hardware and software stack that ran a replica.",
}

CSS = """
body{font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:24px auto;max-width:1180px;
     color:#222;line-height:1.45;padding:0 16px;background:#fff}
h1{font-size:1.6em;margin-bottom:.2em} h2{font-size:1.2em;margin-top:1.8em;border-bottom:1px solid #ddd}
.meta{color:#555;font-size:.9em} .guide{color:#333;max-width:900px}
.none{background:#f6f6f6;border-left:4px solid #bbb;padding:8px 12px;color:#555}
.note{color:#555;font-size:.85em;margin:.2em 0} .scroll{overflow-x:auto}
table.t{border-collapse:collapse;font-size:.8em;margin:.5em 0}
table.t th,table.t td{padding:3px 8px;border-bottom:1px solid #e5e5e5;text-align:right;white-space:nowrap}
table.t th{background:#f3f5f8} img{max-width:100%;height:auto}
"""


def figure_png(fig: Figure, dpi: int = 100) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)  # Agg renders PNG whatever the session's backend
    return buf.getvalue()


def _img(fig: Figure, alt: str) -> str:
    data = base64.b64encode(figure_png(fig)).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _section(title: str, guide: str, body: str) -> str:
    return f'<h2>{html.escape(title)}</h2>\n<p class="guide">{html.escape(guide)}</p>\n{body}\n'


def _header(out_uri: str, runs: pd.DataFrame, progress: dict | None) -> str:
    sweeps = ", ".join(sorted(runs["sweep"].dropna().unique())) if len(runs) else ""
    n_ok = int((runs["status"] == "ok").sum()) if len(runs) else 0
    lines = [f"results tree: <code>{html.escape(out_uri)}</code>",
             f"runs: {n_ok} ok, {len(runs) - n_ok} failed",
             f"generated {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}"]
    if progress:
        lines.append("sweep progress: {done}/{total} done, {failed} failed, {elapsed_s:.0f}s elapsed".format(
            **{"done": "?", "total": "?", "failed": "?", "elapsed_s": math.nan, **progress}))
    return (f"<h1>Tooling noise report{': ' + html.escape(sweeps) if sweeps else ''}</h1>\n"
            + "".join(f'<div class="meta">{line}</div>' for line in lines))


def _failed(runs: pd.DataFrame) -> str:
    bad = runs[runs["status"] != "ok"] if len(runs) else runs
    if bad.empty:
        return ""
    return _section("Failed runs", "Left out of every statistic; re-running the sweep retries them.",
                    table_html(bad[["run_id", "noise", "replica", "error"]].sort_values("run_id")))


def render_html(out_uri: str, runs: reduce.Runs, tables: dict[str, pd.DataFrame],
                progress: dict | None = None) -> str:
    """The whole report as one self-contained HTML page (figures inlined as base64 PNG)."""
    def table(name: str) -> pd.DataFrame:
        return tables.get(name, pd.DataFrame())

    parts = [
        _header(out_uri, runs.meta, progress),
        _section("Accuracy per replica", GUIDE["accuracy"], _img(accuracy_by_noise(runs), "accuracy per replica")),
        _section("Churn and L2 per noise preset", GUIDE["churn"],
                 _img(churn_l2_by_noise(table("variance")), "churn and L2")),
        _section("Per-class accuracy std", GUIDE["per_class"], _img(per_class_std(runs), "per-class std")),
        _section("Noise sources", GUIDE["sources"], _img(source_shares(table("sources")), "share per source")
                 + (table_html(table("sources")) if len(table("sources")) else "")),
        *([_section("Comparison", GUIDE["compare"], table_html(table("compare")))] if "compare" in tables else []),
        _section("Cross-stack pairs", GUIDE["cross_stack"], table_html(table("cross_stack"))),
        _section("Divergence over training", GUIDE["divergence"],
                 _img(divergence_lines(table("divergence")), "distance against epoch")),
        *([_section("First op that differs", GUIDE["diverge"], table_html(table("diverge")))]
          if "diverge" in tables else []),
        _section("Overhead of determinism", GUIDE["overhead"],
                 _img(overhead_bars(table("overhead")), "overhead")
                 + (table_html(table("overhead")) if len(table("overhead")) else "")),
        _section("Which ops deterministic mode slows", GUIDE["overhead_ops"],
                 _img(overhead_ops_bars(table("overhead_ops")), "overhead ops")
                 + (table_html(table("overhead_ops")) if len(table("overhead_ops")) else "")),
        _section("Variance table", GUIDE["variance"], table_html(table("variance"))),
        _section("Subgroups", GUIDE["subgroups"], table_html(table("subgroups"))),
        _section("Fingerprints", GUIDE["fingerprints"], table_html(fingerprints(runs))),
        _failed(runs.meta),
    ]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>Tooling noise report</title><style>{CSS}</style></head><body>\n"
            + "\n".join(parts) + "\n</body></html>\n")


def write_report(out_uri: str) -> str:
    """Compute the tables, write OUT/tables/report.html (atomically) and return its path."""
    tables = load_tables(out_uri)
    for name in ("compare", "diverge"):
        written = load_written(out_uri, name)
        if written is not None:
            tables[name] = written
    page = render_html(out_uri, load_runs(out_uri), tables, load_progress(out_uri))
    fs, root = store.resolve(out_uri)
    path = f"{root}/tables/report.html"
    store.write_bytes(fs, path, page.encode())
    return path if store.is_local(fs) else f"{out_uri.rstrip('/')}/tables/report.html"


def main(argv: list[str] | None = None) -> int:
    """The command line: 0 report written, 2 bad usage or no results tree (nothing written)."""
    parser = argparse.ArgumentParser(prog="python -m orchestrator.report",
                                     description="Figures and tables of a results tree as one HTML page.")
    parser.add_argument("out", help="results tree: local path, s3://bucket/prefix or gs://bucket/prefix")
    args = parser.parse_args(argv)
    if reduce.no_tree(args.out):
        return 2
    with reduce.warnings_on_stderr():
        path = write_report(args.out)
    print(f"report written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
