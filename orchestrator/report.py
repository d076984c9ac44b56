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
import textwrap

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from orchestrator import metrics, reduce, store
from orchestrator.axes import LAUNCH
from orchestrator.noise import PRESETS

NONE = "none in this results tree"
# Grouping keys of the variance table; a figure names a group by the keys that differ between groups.
KEYS = list(reduce.DEFAULT_BY)
PANEL = ["arch", "dataset"]  # one panel per workload family: class counts and accuracy scales differ
FINGERPRINT = ["fingerprint_id", "accelerator", "gpu_name", "gpu_count", "gpu_capability", "gpu_driver",
               "cuda_version", "cudnn_version", "torch_version", "torchvision_version", "ray_version",
               "python_version", "cpu_model", "cpu_capability", "instance_type"]
N_WORST = 3  # classes named per group in the per-class figure
OUTSIDE = {"loc": "upper left", "bbox_to_anchor": (1.01, 1), "borderaxespad": 0}  # legends beside the data
COLUMNS = [*FINGERPRINT, "sweep", "hostname", "error", "epoch_metrics"]  # run columns beyond the reducer's own


# --- loading ----------------------------------------------------------------------------------

def load_runs(out_uri: str) -> reduce.Runs:
    """The run rows the figures and tables here need, read by the reducer's reader
    (`reduce.load_runs`) with the fingerprint columns and the per-epoch losses added; predictions
    stay unread."""
    return reduce.load_runs(out_uri, COLUMNS, lists=["per_class_accuracy", "epoch_loss"])


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


def _group_names(df: pd.DataFrame, skip: list[str] = PANEL) -> pd.Series:
    """A name per row for its group: the noise preset, then the other keys (but `skip`) whose
    values differ between the rows, e.g. `algo, num_threads=2`."""
    others = _labels(df, [k for k in KEYS if k in df and k not in [*skip, "noise"]])
    return df["noise"].astype(str) + others.map(lambda o: f", {o}" if o else "")


def _full_names(df: pd.DataFrame, skip: tuple[str, ...] = ()) -> pd.Series:
    """A name per row that stands alone in a line of text or a facet title: `arch · dataset`, the
    noise preset (where the table has one), then the other keys (but `skip`) that differ between the
    rows of its arch · dataset (a workload hash that differs only with the arch says nothing)."""
    if df.empty:
        return pd.Series(dtype=str)
    keys = [k for k in KEYS if k in df and k not in [*PANEL, "noise", *skip]]
    others = pd.concat([_labels(g, keys) for _, g in _panels(df)]).reindex(df.index)
    lead = df["arch"].astype(str) + " · " + df["dataset"].astype(str)
    if "noise" in df and "noise" not in skip:
        lead = lead + ", " + df["noise"].astype(str)
    return lead + others.map(lambda o: f", {o}" if o else "")


def _rows(df: pd.DataFrame) -> list[tuple[str, str, pd.DataFrame]]:
    """The groups of one panel's rows (runs or a table's groups), one plot row each, as (name,
    noise, its rows): ordered by the tooling values, then by noise preset in the study's order, so
    that the presets of one setting sit together."""
    others = _labels(df, [k for k in KEYS if k in df and k not in [*PANEL, "noise"]])
    rank = {n: i for i, n in enumerate(_noise_order(df["noise"].unique()))}
    rows = [(name, str(g["noise"].iloc[0]), g) for name, g in df.groupby(_group_names(df), sort=False)]
    return sorted(rows, key=lambda r: (others[r[2].index[0]], rank[r[1]]))


def _slots(n_series: int, width: float = 0.8) -> np.ndarray:
    """x offsets of n side-by-side series within one category slot of the given width."""
    return (np.arange(n_series) - (n_series - 1) / 2) * (width / max(n_series, 1))


# Presets keep their colour in every figure (control blue, algo orange, ...); custom noise sets
# take the next ones. 20 distinct colours: tab10, then tab20's lighter shades (also the other
# figures' series colours).
PALETTE = [to_hex(c) for c in (*colormaps["tab10"].colors, *colormaps["tab20"].colors[1::2])]


def _noise_colors(noises) -> dict[str, str]:
    """One colour per noise setting (never one per group, which ran out at 10 groups)."""
    custom = [n for n in _noise_order(noises) if n not in PRESETS]
    index = {**{p: i for i, p in enumerate(PRESETS)}, **{c: len(PRESETS) + i for i, c in enumerate(custom)}}
    return {n: PALETTE[index[n] % len(PALETTE)] for n in _noise_order(noises)}


def _noise_legend(fig: Figure, colors: dict[str, str], marker: str = "o") -> None:
    """One legend for the whole figure, outside every panel: one entry per noise setting drawn."""
    handles = [Line2D([], [], color=c, marker=marker, ls="" if marker else "-", label=n) for n, c in colors.items()]
    fig.legend(handles=handles, title="noise", fontsize=8, loc="outside right upper")


ROW_INCHES = 0.26  # height of one group's row in a row-per-group figure


def _stacked(rows: list[int], ncols: int = 1, width: float = 11.0) -> tuple[Figure, np.ndarray]:
    """One panel per facet, stacked top to bottom, each as tall as its number of rows (one row per
    group), so that 50 groups get a taller figure instead of crowded labels. axes: (facets, ncols)."""
    heights = [ROW_INCHES * r + 1.1 for r in rows]
    fig = Figure(figsize=(width, sum(heights) + 0.5), layout="constrained")
    axes = fig.subplots(len(rows), ncols, squeeze=False, gridspec_kw={"height_ratios": heights})
    return fig, axes


def _row_axis(ax, names: list[str]) -> None:
    """y axis of a row-per-group panel: one labelled row per group, the first on top."""
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_ylim(len(names) - 0.5, -0.5)


def _listed(names, why: str) -> str:
    """A line of HTML naming groups a figure leaves out, and why ("" when none is)."""
    names = sorted(set(names))
    line = f"not drawn, {why} ({len(names)}): " + "; ".join(names)
    return f'<p class="note">{html.escape(line)}</p>' if names else ""


def _spread(variance: pd.DataFrame) -> pd.Series:
    """Groups with a spread to draw: 2 or more ok runs (a group with 0 or 1 has NaN churn and L2)."""
    return variance["n_runs"].fillna(0) >= 2


# --- figures ----------------------------------------------------------------------------------

def accuracy_by_noise(runs: reduce.Runs) -> Figure:
    """Test accuracy of every ok replica: one row per group (noise preset and tooling values), one
    dot per replica coloured by noise preset, a black tick at the mean, and n and the sample std at
    the row's end. One panel per arch · dataset, as tall as its groups, so 50 groups never crowd;
    a group without an ok run is not drawn (the report lists it with the failed runs)."""
    title = "Test accuracy per replica"
    ok = runs.meta[runs.meta["status"] == "ok"].dropna(subset=["test_accuracy"])
    if ok.empty:
        return _empty(title, f"no ok runs: {NONE}")
    colors = _noise_colors(ok["noise"].unique())
    panels = [(name, _rows(g)) for name, g in _panels(ok)]
    fig, axes = _stacked([len(rows) for _, rows in panels])
    for ax, (name, rows) in zip(axes[:, 0], panels):
        for y, (_, noise, g) in enumerate(rows):
            acc = g.sort_values("replica")["test_accuracy"].to_numpy(float)
            # deterministic spread by replica rank: identical accuracies show as a vertical stack of dots
            ys = y + (np.linspace(-0.25, 0.25, len(acc)) if len(acc) > 1 else np.zeros(1))
            ax.scatter(acc, ys, s=14, color=colors[noise], alpha=0.8, zorder=3)
            ax.plot([acc.mean()] * 2, [y - 0.38, y + 0.38], color="black", lw=1.2, zorder=2)  # behind the dots
            sd = f"{metrics.sample_std(acc):.3g}" if len(acc) > 1 else "n/a"  # equal values: exactly 0
            ax.annotate(f"n={len(acc)}, sd={sd}", (1.0, y), xycoords=("axes fraction", "data"), xytext=(4, 0),
                        textcoords="offset points", va="center", fontsize=7, color="#444")
        _row_axis(ax, [r[0] for r in rows])
        ax.margins(x=0.08)
        ax.set_xlabel("test accuracy")
        ax.set_title(name, loc="left", fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    _noise_legend(fig, colors)
    fig.suptitle(title, x=0.01, ha="left")
    return fig


def churn_l2_by_noise(variance: pd.DataFrame) -> Figure:
    """Churn (share of test examples on which two replicas disagree, mean over pairs) and the mean
    pairwise L2 distance of final weights, from the variance table: one bar per group coloured by
    noise preset, churn and L2 side by side, one row of panels per arch · dataset. Groups with
    fewer than 2 ok runs have neither and are not drawn (the report lists them)."""
    title = "Prediction churn and weight distance between replicas"
    if variance.empty:
        return _empty(title, variance.attrs.get("message", NONE) + f" ({NONE})")
    if "noise" not in variance:
        return _empty(title, "the variance table is not grouped by noise (--by without noise)")
    drawn = variance[_spread(variance)]
    if drawn.empty:
        return _empty(title, "no group has 2 ok runs: churn and L2 need a pair of replicas")
    colors = _noise_colors(drawn["noise"].unique())
    panels = [(name, _rows(g)) for name, g in _panels(drawn)]
    fig, axes = _stacked([len(rows) for _, rows in panels], ncols=2, width=12)
    for (name, rows), pair in zip(panels, axes):
        for ax, (col, what, fmt) in zip(pair, (("churn", "churn (fraction of test examples)", ".3f"),
                                               ("l2", "L2 distance of final weights", ".3g"))):
            values = np.array([float(g[col].iloc[0]) for _, _, g in rows])
            y = np.arange(len(rows))
            ax.barh(y, np.nan_to_num(values), 0.7, color=[colors[noise] for _, noise, _ in rows])
            for yi, v in zip(y, values):
                ax.annotate("n/a" if math.isnan(v) else format(v, fmt), (0 if math.isnan(v) else v, yi),
                            xytext=(3, 0), textcoords="offset points", va="center", fontsize=7)
            _row_axis(ax, [r[0] for r in rows])
            ax.margins(x=0.15)
            ax.set_xlim(left=0)  # churn and L2 are never negative
            ax.set_xlabel(what)
            ax.set_title(f"{col}: {name}", loc="left", fontsize=10)
            ax.grid(axis="x", alpha=0.3)
        pair[1].tick_params(labelleft=False)  # the same rows as the churn panel beside it
    fig.get_layout_engine().set(wspace=0.06)  # the churn axis's last tick label apart from L2's first
    _noise_legend(fig, colors, marker="s")
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
    workload group of the sources table; a group none of whose shares has an interval wider than a
    point (2 replicas a preset) is left out, not drawn as a panel of hollow dots (the report names
    it in a line of text)."""
    title = "Which source makes the variance: share of the reference's variance and churn"
    if sources.empty:
        return _empty(title, sources.attrs.get("message", NONE) + f" ({NONE})", size=(8, 1.8))
    keys = [k for k in sources.columns if k in KEYS]
    names = _full_names(sources)
    sources = sources[_with_interval(sources)]
    if sources.empty:
        return _empty(title, "no group's shares have an interval: too few ok replicas per preset", size=(8, 1.8))
    groups = list(sources.groupby(keys, sort=True, dropna=False)) if keys else [((), sources)]
    fig, axes = _grid(len(groups), width=7.5, height=0.55 * sources["source"].nunique() + 1.8, ncols=1)
    for ax, (_, g) in zip(axes, groups):
        y = np.arange(len(g))
        for off, (col, label, color) in zip((-0.16, 0.16), (("share", "accuracy variance", PALETTE[0]),
                                                            ("churn_share", "churn", PALETTE[1]))):
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


def _with_interval(sources: pd.DataFrame) -> pd.Series:
    """Per row of the sources table: whether its group has a share with an interval wider than a
    point (control's exact [0, 0] and the reference's own 1 say nothing at 2 replicas a preset)."""
    known = (sources["share_hi"] > sources["share_lo"]) | (sources["churn_share_hi"] > sources["churn_share_lo"])
    keys = [k for k in sources.columns if k in KEYS]
    return known.groupby([sources[k].astype(str) for k in keys]).transform("any") if keys else known | known.any()


def sources_without_interval(sources: pd.DataFrame) -> list[str]:
    """The groups source_shares leaves out, by name."""
    return [] if sources.empty else list(_full_names(sources)[~_with_interval(sources)].unique())


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
    (a pair of runs of one setting differs only by its seeds) coloured by noise preset, one panel per
    workload family; one legend of presets for the figure, so 50 groups take no 50 legend slots."""
    title = "How far apart runs of one setting grow, epoch by epoch"
    if divergence.empty:
        return _empty(title, divergence.attrs.get("message", NONE))
    if "noise" not in divergence:
        divergence = divergence.assign(noise="all runs")
    colors = _noise_colors(divergence["noise"].unique())
    panels = _panels(divergence)
    fig, axes = _grid(len(panels))
    for ax, (name, df) in zip(axes, panels):
        for _, g in df.groupby(_group_names(df), sort=True):
            ax.plot(g["epoch"], g["distance"], marker="o", ms=3, lw=1, color=colors[str(g["noise"].iloc[0])])
        ax.set_yscale("symlog", linthresh=1e-6)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel("mean distance of weight sketches")
        ax.set_title(name, loc="left")
    _noise_legend(fig, colors)
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
    """Each class's across-replica accuracy std as a heatmap: one row per group (noise preset and
    tooling), one column per class, one panel per arch · dataset as tall as its groups. Each row's
    label names the group's worst classes with their std. Top-1 accuracy averages these swings away."""
    title = "Per-class accuracy std across replicas"
    table = class_std_table(runs)
    if table.empty:
        return _empty(title, f"no group has 2 ok runs with per-class accuracies: {NONE}")
    panels = [(name, _rows(t)) for name, t in _panels(table)]
    fig, axes = _stacked([len(rows) for _, rows in panels], width=12)
    top = float(table["std"].max()) or 1.0  # one colour scale for every panel
    for ax, (name, rows) in zip(axes[:, 0], panels):
        n_classes = max(int(g["class"].max()) for _, _, g in rows) + 1
        grid = np.full((len(rows), n_classes), np.nan)
        labels = []
        for i, (label, _, g) in enumerate(rows):
            grid[i, g["class"].to_numpy(int)] = g["std"].to_numpy(float)
            worst = g[g["std"] > 0].nlargest(N_WORST, "std")
            named = ", ".join(f"{int(c)} ({s:.2f})" for c, s in zip(worst["class"], worst["std"]))
            labels.append(f"{label} (n={g['n_runs'].iloc[0]}): " + (f"worst {named}" if named else
                                                                     "every class identical"))
        image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=top, interpolation="nearest")
        _row_axis(ax, labels)
        if n_classes <= 30:  # beyond that (CIFAR-100) matplotlib's own ticks stay readable
            ax.set_xticks(range(n_classes))
        ax.set_xlabel("class")
        ax.set_title(name, loc="left", fontsize=10)
        fig.colorbar(image, ax=ax, label="std of class accuracy", fraction=0.04, pad=0.01)
    fig.suptitle(title, x=0.01, ha="left")
    return fig


def epoch_losses(runs: reduce.Runs) -> pd.Series:
    """Per run (the index of runs.meta), its training loss per epoch: the built-in loop's
    `epoch_loss`, else the `loss` of every ctx.report call of a user function (epoch_metrics);
    None where neither is recorded."""
    meta = runs.meta
    built_in = (runs.lists["epoch_loss"].to_pylist() if "epoch_loss" in runs.lists.column_names
                else [None] * len(meta))
    reported = meta["epoch_metrics"] if "epoch_metrics" in meta else pd.Series(None, index=meta.index)

    def user(calls_json) -> list[float] | None:
        calls = json.loads(calls_json) if isinstance(calls_json, str) else []
        losses = [c.get("loss") for c in calls]
        return losses if losses and all(isinstance(v, (int, float)) for v in losses) else None
    return pd.Series([b if b is not None else user(j) for b, j in zip(built_in, reported)], index=meta.index,
                     dtype=object)


def loss_curves(runs: reduce.Runs) -> Figure:
    """Training loss against epoch: one panel per workload and tooling setting (small multiples,
    three a row), in it one thin line per ok replica and a thick one at their mean, coloured by
    noise preset. Replicas that trained bitwise alike draw one line."""
    title = "Training loss per epoch"
    losses = epoch_losses(runs)
    ok = runs.meta[(runs.meta["status"] == "ok") & losses.notna()]
    if ok.empty:
        return _empty(title, f"no ok run recorded a loss per epoch: {NONE} (a function of your own reports one "
                             "with ctx.report(epoch=..., loss=...))")
    colors = _noise_colors(ok["noise"].unique())
    names = _full_names(ok, skip=("noise",))
    facets = list(ok.groupby(names, sort=True))
    fig, axes = _grid(len(facets), width=4.2, height=2.9, ncols=3)
    for ax, (name, g) in zip(axes, facets):
        for noise in _noise_order(g["noise"].unique()):
            curves = [losses[i] for i in g.index[g["noise"] == noise]]
            for c in curves:
                ax.plot(range(1, len(c) + 1), c, color=colors[noise], lw=0.7, alpha=0.5)
            n = min(len(c) for c in curves)
            ax.plot(range(1, n + 1), np.mean([c[:n] for c in curves], axis=0), color=colors[noise], lw=2)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch", fontsize=8)
        ax.set_ylabel("training loss", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_title(textwrap.fill(name, 48), loc="left", fontsize=8)
        ax.grid(alpha=0.3)
    _noise_legend(fig, colors, marker="")
    fig.suptitle(title, x=0.01, ha="left")
    return fig


def stacks(variance: pd.DataFrame) -> list[str]:
    """The stacks of the variance table, the one the others are compared with first (`launch` where
    it ran, else the first by name)."""
    if "stack" not in variance:
        return []
    return sorted(variance["stack"].dropna().astype(str).unique(), key=lambda s: (s != LAUNCH, s))


def stack_heatmap(variance: pd.DataFrame) -> Figure:
    """Mean test accuracy of every group (rows) on every stack (columns), each cell labelled with it
    and, beside the first stack, with the difference to the first stack's, which colours the cell
    (blue: higher, red: lower). A group with no ok run on a stack is a blank cell; a group with
    none on any stack is not drawn (the report lists it with the failed runs)."""
    title = "Mean accuracy per stack (colour: difference to the first stack)"
    names = stacks(variance)
    if len(names) < 2:
        return _empty(title, f"one stack in this results tree ({', '.join(names) or NONE}): "
                             "add `stacks:` to the sweep to compare environments")
    noise = variance["noise"] if "noise" in variance else pd.Series("", index=variance.index)
    rank = {n: i for i, n in enumerate(_noise_order(noise.unique()))}
    ordered = variance.assign(_row=_full_names(variance, skip=("stack",)), _rank=noise.astype(str).map(rank))
    ordered = ordered.sort_values(["arch", "dataset", "_rank"], kind="stable")  # presets in the study's order
    acc = ordered.pivot_table(index="_row", columns="stack", values="acc_mean", sort=False)
    acc = acc.reindex(columns=names).dropna(how="all")
    diff = acc.sub(acc[names[0]], axis=0)
    scale = float(np.nanmax(np.abs(diff.to_numpy()), initial=0.0)) or 1e-3
    fig = Figure(figsize=(max(8.0, 5.5 + 1.5 * len(names)), ROW_INCHES * 1.3 * len(acc) + 1.8), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(diff.to_numpy(float), aspect="auto", cmap="RdBu", vmin=-scale, vmax=scale,
                      interpolation="nearest")
    for (i, j), a in np.ndenumerate(acc.to_numpy(float)):
        if np.isfinite(a):
            d = diff.iat[i, j]
            ax.text(j, i, f"{a:.4f}" + (f" ({d:+.4f})" if j else ""), ha="center", va="center", fontsize=7,
                    color="white" if abs(d) > 0.6 * scale else "black")  # legible on the darkest cells
    _row_axis(ax, list(acc.index))
    ax.set_xticks(range(len(names)), names)
    ax.xaxis.tick_top()
    ax.set_xlabel("stack")
    fig.colorbar(image, ax=ax, label=f"mean accuracy − {names[0]}'s", fraction=0.04, pad=0.01)
    fig.suptitle(title, x=0.01, ha="left")
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
        ax.bar(x, pct, w * 0.9, yerr=[lo, hi], capsize=4, color=PALETTE[i % len(PALETTE)], label=name)
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
        for dy, mode, color in ((0.2, "nondet", PALETTE[0]), (-0.2, "det", PALETTE[3])):
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


def runs_table(runs: reduce.Runs) -> pd.DataFrame:
    """One row per run: its group, replica, status, test accuracy and training wall time."""
    meta = runs.meta
    cols = ["run_id", *[k for k in KEYS if k in meta], "replica", "status", "test_accuracy", "train_seconds"]
    out = meta[cols].sort_values("run_id") if len(meta) else pd.DataFrame(columns=cols)
    out.attrs["message"] = "no runs under OUT/runs"
    return out


ERROR_CHARS = 240  # of a failed run's error in the report; the whole traceback is in OUT/logs/<run_id>.log


def failed_runs(runs: reduce.Runs) -> pd.DataFrame:
    """One row per run that did not end ok, with the first line of its error."""
    meta = runs.meta
    bad = meta[meta["status"] != "ok"] if len(meta) else meta
    first = bad["error"].fillna("").astype(str).str.split("\n").str[0].str.slice(0, ERROR_CHARS)
    cols = ["run_id", *[k for k in KEYS if k in bad], "replica", "status", "error"]
    return bad.assign(error=first)[cols].sort_values("run_id")


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
    "accuracy": "One row per group, one dot per replica, coloured by noise preset. Dots stacked at one "
                "accuracy mean the replicas are bitwise the same model (expected for control on a CPU); the "
                "spread of algo is the run-to-run variance a single reported number hides. The black tick is "
                "the mean; n and the sample std end each row.",
    "loss": "Training loss per epoch: one panel per workload and tooling setting, a thin line per replica "
            "and a thick one at their mean, coloured by noise preset. From the built-in loop's epoch_loss, "
            "or the loss a function of your own reports with ctx.report.",
    "churn": "Churn is the share of test examples on which two replicas predict different classes "
             "(mean over replica pairs; disagreement, not the reference code's agreement). L2 is the "
             "mean pairwise distance of the final weights. Both can be large while top-1 accuracy barely moves.",
    "per_class": "The std across replicas of each class's accuracy, one row per group and one column per "
                 "class. Top-1 accuracy averages these swings away; each row's label names its worst classes "
                 "with their std.",
    "stacks": "Mean test accuracy of each group on each software stack; each cell beside the first stack also "
              "gives its difference to the first stack's, which colours it (blue higher, red lower). The "
              "cross-stack pairs further down say whether same-seed runs agree bit for bit.",
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
    "runs": "Every run: its group, status, test accuracy and training wall time (train_seconds, set-up and "
            "evaluation excluded). The variance table gives each group's mean (train_seconds_mean).",
    "failed": "Left out of every statistic and every figure; re-running the sweep retries them. The error is "
              "its first line; the whole traceback is in OUT/logs/<run_id>.log.",
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
table.t th{background:#f3f5f8} img{max-width:100%;height:auto} summary{cursor:pointer;color:#335}
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


def _failed(runs: reduce.Runs, variance: pd.DataFrame) -> str:
    bad = failed_runs(runs)
    if bad.empty:
        return ""
    dead = _full_names(variance)[variance["n_runs"] == 0] if len(variance) and "n_runs" in variance else []
    return _section("Failed runs", GUIDE["failed"], _listed(dead, "no ok run in the group") + table_html(bad))


def render_html(out_uri: str, runs: reduce.Runs, tables: dict[str, pd.DataFrame],
                progress: dict | None = None) -> str:
    """The whole report as one self-contained HTML page (figures inlined as base64 PNG)."""
    def table(name: str) -> pd.DataFrame:
        return tables.get(name, pd.DataFrame())

    variance, sources = table("variance"), table("sources")
    # named among all groups, so that a name carries the settings that tell it from the drawn ones
    thin = (_full_names(variance)[~_spread(variance)] if len(variance) and "noise" in variance
            else pd.Series(dtype=str))
    parts = [
        _header(out_uri, runs.meta, progress),
        _failed(runs, variance),
        _section("Accuracy per replica", GUIDE["accuracy"], _img(accuracy_by_noise(runs), "accuracy per replica")),
        *([_section("Accuracy per stack", GUIDE["stacks"], _img(stack_heatmap(variance), "accuracy per stack"))]
          if len(stacks(variance)) > 1 else []),
        _section("Training loss per epoch", GUIDE["loss"], _img(loss_curves(runs), "loss per epoch")),
        _section("Churn and L2 per noise preset", GUIDE["churn"],
                 _img(churn_l2_by_noise(variance), "churn and L2")
                 + _listed(thin, "fewer than 2 ok runs")),
        _section("Per-class accuracy std", GUIDE["per_class"], _img(per_class_std(runs), "per-class std")),
        _section("Noise sources", GUIDE["sources"], _img(source_shares(sources), "share per source")
                 + _listed(sources_without_interval(sources), "no share with an interval")
                 + (table_html(sources) if len(sources) else "")),
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
        _section("Variance table", GUIDE["variance"], table_html(variance)),
        _section("Subgroups", GUIDE["subgroups"], table_html(table("subgroups"))),
        _section("Fingerprints", GUIDE["fingerprints"], table_html(fingerprints(runs))),
        _section("Runs", GUIDE["runs"], f"<details><summary>all {len(runs.meta)} runs, with their wall time"
                 f"</summary>{table_html(runs_table(runs))}</details>"),
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
