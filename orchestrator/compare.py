"""Is configuration A really better than B, is it the same, and how many replicas would tell?

    python -m orchestrator.compare OUT --a KEY=VAL[,KEY=VAL] --b KEY=VAL[,KEY=VAL] [--effect X] [--margin M]

Keys are run columns (noise, arch, accelerator_requested, precision, num_threads, stack, ...). Runs
are compared within each workload group (every default grouping column the two sides do not name),
so two architectures are never pooled into one side. One row per group that has ok runs on both
sides, printed and written to OUT/tables/compare.{md,csv,parquet} (all three every time: the report
reads the parquet). Exit 0 written, 2 bad usage; with --require (a CI gate over all groups): 0 holds,
1 does not hold, 3 the replicas cannot decide (the count that would is printed).

When both sides ran the same replica indices, replica r of each shares its seeds: the sides are
`paired`, and the interval, the test, the power and the equivalence test are the paired t-test's;
otherwise Welch's.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import sys

import numpy as np
import pandas as pd
from scipy import stats

from orchestrator import metrics, reduce, store

POWER, ALPHA, ASSURANCE = 0.8, 0.05, 0.8
COMPARE = ["a", "b", "n_a", "n_b", "mean_a", "mean_b", "std_a", "std_b", "paired", "std_diff", "test", "diff",
           "diff_lo", "diff_hi", "t", "p", "p_a_gt_b", "p_a_gt_b_lo", "p_a_gt_b_hi", "welch_t", "welch_p", "aso_eps",
           "replicas_needed", "effect", "replicas_needed_effect", "margin", "tost_p", "equivalent", "exact",
           "same_weights", "p_adj", "tost_p_adj", "no_worse_p", "gate_replicas", "note"]
POWER_NOTE = (f"replicas_needed: runs per side (pairs, when paired) with which the row's `test` (paired t or Welch t) "
              f"at alpha = {ALPHA} detects the observed difference (replicas_needed_effect: --effect) with "
              f"{POWER:.0%} power in {ASSURANCE:.0%} of pilots: at the upper one-sided {ASSURANCE:.0%} confidence "
              f"limit of the observed stds (paired: std_diff, the std of the differences; Browne 1995), since "
              f"these runs are a pilot whose stds are uncertain")


def parse_side(flag: str, text: str) -> dict[str, str]:
    """`noise=algo,accelerator_requested=A100` -> {column: value}; UsageError naming the flag."""
    pairs = [p.split("=", 1) for p in text.split(",") if p]
    if not pairs or any(len(p) != 2 or not p[0] for p in pairs):
        raise reduce.UsageError(f"{flag} {text!r}: expected KEY=VAL[,KEY=VAL], e.g. {flag} noise=algo")
    unknown = [k for k, _ in pairs if k not in store.RUN_SCHEMA.names and k != "workload"]
    if unknown or any(k in reduce.LISTS for k, _ in pairs):
        raise reduce.UsageError(f"{flag}: {', '.join(unknown) or 'a list column'} is not a run column; "
                                f"use columns such as {', '.join(reduce.DEFAULT_BY)}")
    return dict(pairs)


def _as_text(column: pd.Series) -> pd.Series:
    """A column as the strings a user types: booleans as true/false, integers without `.0`."""
    if pd.api.types.is_bool_dtype(column):
        return column.map({True: "true", False: "false"}).astype(object)
    return column.astype(object).map(lambda v: "" if pd.isna(v) else str(v))


def select(meta: pd.DataFrame, side: dict[str, str]) -> pd.Series:
    """Rows whose columns equal every value of a side (booleans compared case-insensitively)."""
    mask = pd.Series(True, index=meta.index)
    for column, value in side.items():
        text = _as_text(meta[column])
        mask &= text == (value.lower() if value.lower() in ("true", "false") else value)
    return mask


def group_seed(seed: int, key: dict) -> int:
    """A seed per group from --seed and the group's key, for ASO (the one randomised statistic):
    reproducible whatever other groups the results tree holds."""
    text = json.dumps([seed, [str(v) for v in key.values()]])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


def aso_eps(a: np.ndarray, b: np.ndarray, seed: int) -> float:
    """Almost Stochastic Order ε_min of A over B (Dror et al. 2019) when the optional `deepsig`
    is installed: below 0.5 leans A, 0 is A stochastically dominant. NaN without it."""
    if importlib.util.find_spec("deepsig") is None or len(a) < 2 or len(b) < 2:
        return math.nan
    from deepsig import aso

    return float(aso(a, b, confidence_level=1 - ALPHA, show_progress=False, seed=seed))


def _verdict(row: dict) -> str:
    """The equivalence answer of one compare row, as a sentence (--margin)."""
    m = row["margin"]
    if row["same_weights"]:
        return (f"exact: every pair has the same weights and accuracy on both sides (bit for bit); difference 0, "
                f"inside ±{m:g}")
    if row["exact"]:
        return (f"exact: both sides reproduce bit for bit; difference {row['diff']:.4g}, "
                f"{'inside' if abs(row['diff']) < m else 'outside'} ±{m:g}")
    if math.isnan(row["tost_p"]):
        return f"cannot tell whether the sides are equivalent within ±{m:g}: a side has fewer than 2 ok runs"
    if row["equivalent"]:
        return (f"the two sides are equivalent within ±{m:g} accuracy (TOST, {row['test']}, "
                f"p = {row['tost_p']:.3g})")
    return (f"not shown equivalent within ±{m:g} accuracy (TOST, {row['test']}, p = {row['tost_p']:.3g}): "
            f"'not significantly different' is not 'the same'; more replicas or a wider margin")


def gate_replicas(diff: float, std: float, margin: float, require: str, power: float = POWER) -> float:
    """Runs per side (pairs) with which the gate's one-sided tests at ALPHA would show the observed
    difference inside the margin (equivalent: |diff| < M; no-worse: diff > -M) with `power`, at the
    observed std (of the differences when paired, sqrt(std_a² + std_b²) otherwise): the smallest n
    with distance / (std/√n) >= t_{1-α, n-1} + z_power, the normal-approximate power of TOST's
    nearer bound. inf when the observed difference is outside (no count shows it)."""
    gap = margin - abs(diff) if require == "equivalent" else margin + diff
    if math.isnan(gap) or math.isnan(std) or gap <= 0:
        return math.inf if gap <= 0 else math.nan
    z = float(stats.norm.ppf(power))
    return metrics._smallest(
        lambda n: gap * math.sqrt(n) / std >= float(stats.t.ppf(1 - ALPHA, n - 1)) + z, 2, 10 ** 6)


def compare_sides(a: pd.DataFrame, b: pd.DataFrame, effect: float | None, seed: int,
                  margin: float | None = None, n_test: int = 0, require: str = "equivalent") -> dict:
    """Every comparison number of one group: ok runs of side a against side b. Sides whose weights
    are each one digest, or paired sides whose every pair has one digest and one accuracy
    (`same_weights`: the change did not move a bit, as a library upgrade whose kernels did not change), are `exact`: the
    difference is a fact, not a test (t, p, tost_p NaN). Otherwise the se is floored at what ties at
    the test set's resolution (1/n_test) can hide."""
    paired = a["replica"].is_unique and b["replica"].is_unique and set(a["replica"]) == set(b["replica"])
    a, b = a.sort_values(["replica", "run_id"]), b.sort_values(["replica", "run_id"])
    xa, xb = a["test_accuracy"].to_numpy(float), b["test_accuracy"].to_numpy(float)
    # the same weights can still predict differently (another stack's evaluation kernels): both must agree
    same_weights = paired and bool((xa == xb).all()) and all(
        metrics.identical(pair) for pair in zip(a["weights_sha256"], b["weights_sha256"]))
    exact = same_weights or (metrics.identical(a["weights_sha256"].tolist())
                             and metrics.identical(b["weights_sha256"].tolist()))
    sa, sb = metrics.sample_std(xa), metrics.sample_std(xb)
    sd = metrics.sample_std(xa - xb) if paired else math.nan
    md = metrics.mean_diff(xa, xb, paired, 0.0 if exact else metrics.tie_var(n_test))
    stds, pilot = ((sd,), (len(xa),)) if paired else ((sa, sb), (len(xa), len(xb)))

    def needed(diff: float) -> float:
        return metrics.replicas_needed(diff, stds, POWER, ALPHA, pilot=pilot, assurance=ASSURANCE)
    notes = [] if len(xa) >= 2 and len(xb) >= 2 else ["a side has fewer than 2 ok runs"]
    if sa == 0 and sb == 0 and not exact:
        notes.append("no spread on either side but weights differ: accuracies tie at the test set's "
                     "resolution, the se is floored there")
    notes.append(f"test: {md.test}" + (f" on {len(xa)} pairs" if paired else "")
                 + ("" if math.isnan(md.p) else ", p exact by sign flips of the differences (tied accuracies)")
                 + "; replicas_needed assumes it")
    row = {"n_a": len(xa), "n_b": len(xb), "mean_a": xa.mean(), "mean_b": xb.mean(), "std_a": sa, "std_b": sb,
           "paired": paired, "std_diff": sd, "test": md.test, "diff": md.diff,
           **dict(zip(("diff_lo", "diff_hi"), metrics.t_interval(md))), **dict(zip(("t", "p"), metrics.t_test(md))),
           **dict(zip(("p_a_gt_b", "p_a_gt_b_lo", "p_a_gt_b_hi"), metrics.prob_improvement_ci(xa, xb, paired))),
           **dict(zip(("welch_t", "welch_p"), metrics.t_test(metrics.mean_diff(xa, xb, paired=False)))),
           "aso_eps": aso_eps(xa, xb, seed % 2**32),
           "replicas_needed": needed(md.diff),
           "effect": math.nan if effect is None else effect,
           "replicas_needed_effect": math.nan if effect is None else needed(effect),
           "margin": math.nan if margin is None else margin,
           "tost_p": math.nan if margin is None else metrics.tost_p(md, margin)}
    row["exact"], row["same_weights"] = exact, same_weights
    row["no_worse_p"] = (math.nan if margin is None or math.isnan(md.se) or md.se == 0
                         else float(stats.t.sf((md.diff + margin) / md.se, md.df)))
    if exact:
        row["t"] = row["p"] = row["welch_t"] = row["welch_p"] = row["tost_p"] = math.nan
        row["equivalent"] = None if margin is None else bool(abs(md.diff) < margin)
    else:
        row["equivalent"] = None if margin is None or math.isnan(row["tost_p"]) else bool(row["tost_p"] < ALPHA)
    std = sd if paired else math.sqrt(sa * sa + sb * sb) if len(xa) >= 2 and len(xb) >= 2 else math.nan
    row["gate_replicas"] = (math.nan if margin is None or exact
                            else gate_replicas(md.diff, max(std, math.sqrt(2 * metrics.tie_var(n_test))), margin,
                                               require))
    if margin is not None:
        notes.append(_verdict(row))
    return row | {"note": "; ".join(notes)}


def compare(out_uri: str, side_a: dict[str, str], side_b: dict[str, str], effect: float | None = None,
            seed: int = 0, margin: float | None = None, require: str = "equivalent") -> pd.DataFrame:
    """The compare table of a results tree (not written). UsageError when a side matches no ok
    run, the sides share runs, or no group holds both sides."""
    named = list(dict.fromkeys([*side_a, *side_b]))
    runs = reduce.load_runs(out_uri, list(dict.fromkeys([*reduce.DEFAULT_BY, *named])))
    ok = runs.meta[(runs.meta["status"] == "ok") & runs.meta["test_accuracy"].notna()]
    in_a, in_b = select(ok, side_a), select(ok, side_b)
    for flag, side, mask in (("--a", side_a, in_a), ("--b", side_b, in_b)):
        if not mask.any():
            present = {k: sorted(set(_as_text(ok[k]))) for k in side}
            raise reduce.UsageError(f"{flag}: no ok run has {side}; values present: {present}")
    both = in_a & in_b
    if (in_a == in_b).all():
        raise reduce.UsageError("--a and --b select the same runs; give them different values")
    if both.any():
        raise reduce.UsageError(
            f"--a and --b overlap: {int(both.sum())} ok run(s) match both, e.g. {ok.loc[both, 'run_id'].iloc[0]}; "
            f"name the same keys on both sides ({', '.join(named)}) with different values")
    by = [c for c in reduce.DEFAULT_BY if c not in named and ok[c].notna().any()]
    label_a, label_b = (",".join(f"{k}={v}" for k, v in s.items()) for s in (side_a, side_b))
    rows = []
    for vals, g in ok.groupby(by, dropna=False, sort=True):
        key = dict(zip(by, vals))
        a, b = g[in_a[g.index]], g[in_b[g.index]]
        if len(a) and len(b):
            preds = runs.matrix("predictions", g.index)
            rows.append({**key, "a": label_a, "b": label_b,
                         **compare_sides(a, b, effect, group_seed(seed, {**key, "a": label_a, "b": label_b}),
                                         margin, preds.shape[1] if preds is not None else 0, require)})
    if not rows:
        raise reduce.UsageError(f"no workload group ({', '.join(by)}) has ok runs of both --a and --b")
    table = pd.DataFrame(rows, columns=by + COMPARE)
    # Holm over the table's groups: each row's `equivalent` is read from the adjusted p (an exact row
    # is a fact and keeps its own); the gate needs every group, an intersection–union test, so it reads the raw
    table["p_adj"], table["tost_p_adj"] = metrics.holm(table["p"]), metrics.holm(table["tost_p"])
    tested = table["tost_p_adj"].notna()
    table.loc[tested, "equivalent"] = table.loc[tested, "tost_p_adj"] < ALPHA
    table["equivalent"] = table["equivalent"].astype("boolean")
    return table


def gate(table: pd.DataFrame, require: str) -> tuple[int, list[str]]:
    """One verdict over every group (--require): 0 it holds in all, 1 it fails in one (the observed
    difference is outside the margin), 3 the replicas cannot decide (inside, but not shown at α).

    Family-wise: the claim is that *every* group passes, an intersection–union test (Berger 1982),
    so each group's one-sided tests at α keep the chance of a false pass at α whatever the number of
    groups, with no adjustment. An exact row (both sides bit for bit) passes or fails as a fact."""
    lines, codes = [], []
    m = float(table["margin"].iloc[0])
    for _, row in table.iterrows():
        d = row["diff"]
        inside = abs(d) < m if require == "equivalent" else d > -m
        if row["exact"]:
            code = 0 if inside else 1
        else:
            p = row["tost_p"] if require == "equivalent" else row["no_worse_p"]
            code = 0 if p < ALPHA else 3 if inside or math.isnan(p) else 1
        codes.append(code)
        if code:
            words = {1: "fails", 3: f"undecided: about {row['gate_replicas']:.0f} replicas per side would decide"}
            lines.append(f"{row['a']} vs {row['b']} ({_group_label(table, row)}): diff {d:.4g}, {words[code]}")
    overall = 1 if 1 in codes else 3 if 3 in codes else 0
    head = {0: "holds", 1: "does not hold", 3: "cannot be decided with these replicas"}[overall]
    return overall, [f"gate --require {require} within ±{m:g}: {head} in {codes.count(0)} of {len(codes)} groups",
                     *lines]


def _group_label(table: pd.DataFrame, row: pd.Series) -> str:
    """The group's key columns that vary in the table, as col=value."""
    groups = list(table.columns[:table.columns.get_loc("a")])
    return ", ".join(f"{c}={row[c]}" for c in groups if table[c].nunique() > 1) or "all"


def main(argv: list[str] | None = None) -> int:
    """The command line: 0 table written, 2 bad usage or no results tree (nothing written)."""
    parser = argparse.ArgumentParser(prog="python -m orchestrator.compare", description=__doc__.split("\n")[0])
    parser.add_argument("out", help="results tree: local path, s3://bucket/prefix or gs://bucket/prefix")
    parser.add_argument("--a", required=True, help="side A, e.g. noise=algo,precision=bf16")
    parser.add_argument("--b", required=True, help="side B, e.g. noise=algo,precision=fp32")
    parser.add_argument("--effect", type=float, help="an accuracy difference to size replicas for, e.g. 0.005")
    parser.add_argument("--margin", type=float,
                        help="equivalence margin: test whether |mean A - mean B| < M (TOST), e.g. 0.005")
    parser.add_argument("--require", choices=("equivalent", "no-worse"),
                        help="CI gate over all groups (needs --margin): exit 0 holds, 1 fails, 3 undecided")
    parser.add_argument("--seed", type=int, default=0, help="seed of Almost Stochastic Order (deepsig), if installed")
    args = parser.parse_args(argv)
    if args.effect is not None and not (math.isfinite(args.effect) and args.effect != 0):
        parser.error("--effect: give a non-zero accuracy difference, e.g. --effect 0.005")
    if args.margin is not None and not (math.isfinite(args.margin) and args.margin > 0):
        parser.error("--margin: give a positive accuracy difference, e.g. --margin 0.005")
    if args.require and args.margin is None:
        parser.error("--require: give --margin too, e.g. --require equivalent --margin 0.005")
    if reduce.no_tree(args.out):
        return 2
    try:
        with reduce.warnings_on_stderr():
            table = compare(args.out, parse_side("--a", args.a), parse_side("--b", args.b), args.effect, args.seed,
                            args.margin, args.require or "equivalent")
    except reduce.UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    fs, root = store.resolve(args.out)
    reduce.write_tables(fs, root, {"compare": table})
    print(f"## compare\n\n{reduce.format_markdown(table)}\n\n{POWER_NOTE}\n")
    if args.margin is not None:
        for _, row in table.iterrows():
            print(f"{_group_label(table, row)}: {_verdict(row.to_dict())}")
        print()
    print(f"table written to {root}/tables ({', '.join(reduce.FORMATS)})")
    if not args.require:
        return 0
    code, lines = gate(table, args.require)
    print("\n".join(lines))
    return code


if __name__ == "__main__":
    sys.exit(main())
