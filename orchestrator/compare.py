"""Is configuration A really better than B, is it the same, and how many replicas would tell?

    python -m orchestrator.compare OUT --a KEY=VAL[,KEY=VAL] --b KEY=VAL[,KEY=VAL] [--effect X] [--margin M]

Keys are run columns (noise, arch, accelerator_requested, precision, num_threads, stack, ...). Runs
are compared within each workload group (every default grouping column the two sides do not name),
so two architectures are never pooled into one side. One row per group that has ok runs on both
sides, printed and written to OUT/tables/compare.{md,csv,parquet} (all three every time: the report
reads the parquet). Exit 0 written, 2 bad usage.

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

from orchestrator import metrics, reduce, store

POWER, ALPHA = 0.8, 0.05
COMPARE = ["a", "b", "n_a", "n_b", "mean_a", "mean_b", "std_a", "std_b", "paired", "std_diff", "test", "diff",
           "diff_lo", "diff_hi", "t", "p", "p_a_gt_b", "p_a_gt_b_lo", "p_a_gt_b_hi", "welch_t", "welch_p", "aso_eps",
           "replicas_needed", "effect", "replicas_needed_effect", "margin", "tost_p", "equivalent", "note"]
POWER_NOTE = (f"replicas_needed: runs per side (pairs, when paired) with which the row's `test` (paired t or Welch t) "
              f"at alpha = {ALPHA} detects the observed difference (replicas_needed_effect: --effect) with "
              f"{POWER:.0%} power, at the observed stds (paired: std_diff, the std of the differences)")


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
    if math.isnan(row["tost_p"]):
        return f"cannot tell whether the sides are equivalent within ±{m:g}: a side has fewer than 2 ok runs"
    if row["equivalent"]:
        return (f"the two sides are equivalent within ±{m:g} accuracy (TOST, {row['test']}, "
                f"p = {row['tost_p']:.3g})")
    return (f"not shown equivalent within ±{m:g} accuracy (TOST, {row['test']}, p = {row['tost_p']:.3g}): "
            f"'not significantly different' is not 'the same'; more replicas or a wider margin")


def compare_sides(a: pd.DataFrame, b: pd.DataFrame, effect: float | None, seed: int,
                  margin: float | None = None) -> dict:
    """Every comparison number of one group: ok runs of side a against side b."""
    paired = a["replica"].is_unique and b["replica"].is_unique and set(a["replica"]) == set(b["replica"])
    xa = a.sort_values(["replica", "run_id"])["test_accuracy"].to_numpy(float)
    xb = b.sort_values(["replica", "run_id"])["test_accuracy"].to_numpy(float)
    sa, sb = metrics.sample_std(xa), metrics.sample_std(xb)
    sd = metrics.sample_std(xa - xb) if paired else math.nan
    md = metrics.mean_diff(xa, xb, paired)
    stds = (sd,) if paired else (sa, sb)
    notes = [] if len(xa) >= 2 and len(xb) >= 2 else ["a side has fewer than 2 ok runs"]
    if sa == 0 and sb == 0:
        notes.append("no spread on either side: every replica agrees, so any difference is exact")
    notes.append(f"test: {md.test}" + (f" on {len(xa)} pairs" if paired else "") + "; replicas_needed assumes it")
    row = {"n_a": len(xa), "n_b": len(xb), "mean_a": xa.mean(), "mean_b": xb.mean(), "std_a": sa, "std_b": sb,
           "paired": paired, "std_diff": sd, "test": md.test, "diff": md.diff,
           **dict(zip(("diff_lo", "diff_hi"), metrics.t_interval(md))), **dict(zip(("t", "p"), metrics.t_test(md))),
           **dict(zip(("p_a_gt_b", "p_a_gt_b_lo", "p_a_gt_b_hi"), metrics.prob_improvement_ci(xa, xb, paired))),
           **dict(zip(("welch_t", "welch_p"), metrics.t_test(metrics.mean_diff(xa, xb, paired=False)))),
           "aso_eps": aso_eps(xa, xb, seed % 2**32),
           "replicas_needed": metrics.replicas_needed(md.diff, stds, POWER, ALPHA),
           "effect": math.nan if effect is None else effect,
           "replicas_needed_effect": (math.nan if effect is None
                                      else metrics.replicas_needed(effect, stds, POWER, ALPHA)),
           "margin": math.nan if margin is None else margin,
           "tost_p": math.nan if margin is None else metrics.tost_p(md, margin)}
    row["equivalent"] = None if margin is None or math.isnan(row["tost_p"]) else bool(row["tost_p"] < ALPHA)
    if margin is not None:
        notes.append(_verdict(row))
    return row | {"note": "; ".join(notes)}


def compare(out_uri: str, side_a: dict[str, str], side_b: dict[str, str], effect: float | None = None,
            seed: int = 0, margin: float | None = None) -> pd.DataFrame:
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
            rows.append({**key, "a": label_a, "b": label_b,
                         **compare_sides(a, b, effect, group_seed(seed, {**key, "a": label_a, "b": label_b}),
                                         margin)})
    if not rows:
        raise reduce.UsageError(f"no workload group ({', '.join(by)}) has ok runs of both --a and --b")
    table = pd.DataFrame(rows, columns=by + COMPARE)
    table["equivalent"] = table["equivalent"].astype("boolean")
    return table


def main(argv: list[str] | None = None) -> int:
    """The command line: 0 table written, 2 bad usage or no results tree (nothing written)."""
    parser = argparse.ArgumentParser(prog="python -m orchestrator.compare", description=__doc__.split("\n")[0])
    parser.add_argument("out", help="results tree: local path, s3://bucket/prefix or gs://bucket/prefix")
    parser.add_argument("--a", required=True, help="side A, e.g. noise=algo,precision=bf16")
    parser.add_argument("--b", required=True, help="side B, e.g. noise=algo,precision=fp32")
    parser.add_argument("--effect", type=float, help="an accuracy difference to size replicas for, e.g. 0.005")
    parser.add_argument("--margin", type=float,
                        help="equivalence margin: test whether |mean A - mean B| < M (TOST), e.g. 0.005")
    parser.add_argument("--seed", type=int, default=0, help="seed of Almost Stochastic Order (deepsig), if installed")
    args = parser.parse_args(argv)
    if args.effect is not None and not (math.isfinite(args.effect) and args.effect != 0):
        parser.error("--effect: give a non-zero accuracy difference, e.g. --effect 0.005")
    if args.margin is not None and not (math.isfinite(args.margin) and args.margin > 0):
        parser.error("--margin: give a positive accuracy difference, e.g. --margin 0.005")
    if reduce.no_tree(args.out):
        return 2
    try:
        with reduce.warnings_on_stderr():
            table = compare(args.out, parse_side("--a", args.a), parse_side("--b", args.b), args.effect, args.seed,
                            args.margin)
    except reduce.UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    fs, root = store.resolve(args.out)
    reduce.write_tables(fs, root, {"compare": table})
    print(f"## compare\n\n{reduce.format_markdown(table)}\n\n{POWER_NOTE}\n")
    if args.margin is not None:
        groups = list(table.columns[:table.columns.get_loc("a")])
        for _, row in table.iterrows():
            where = ", ".join(f"{c}={row[c]}" for c in groups if table[c].nunique() > 1)
            print(f"{where + ': ' if where else ''}{_verdict(row.to_dict())}")
        print()
    print(f"table written to {root}/tables ({', '.join(reduce.FORMATS)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
