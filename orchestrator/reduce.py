"""The tables: run-to-run variance per group (with subgroups and significance), cross-stack pairs,
and the cost of determinism.

    python -m orchestrator.reduce OUT [--by COLS] [--format md,csv,parquet]

Reads OUT/runs/*.parquet, OUT/weights/*.safetensors, OUT/datasets/*.parquet and
OUT/overhead/*.parquet; prints Markdown and writes OUT/tables/<table>.{md,csv,parquet}. Failed runs
are counted (n_failed) and left out of every statistic, so `n_runs` is the number of ok runs a
statistic stands on. A statistic a group has too few runs for is NaN with a `note`, never an error.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import math
import sys
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from safetensors import SafetensorError, safe_open

from orchestrator import axes, lease, metrics, sources, store

# Tooling axes are grouping keys: a thread count or a stack is not noise, it changes the bits.
# Their run columns, each with its axis (orchestrator/axes.py: RunSpec field, default).
TOOLING = axes.COLUMNS
# `workload` hashes the training settings, so two learning rates never pool into one std.
DEFAULT_BY = ("arch", "dataset", "accelerator_requested", "noise", *TOOLING, "workload")
# Cross-stack: runs equal in everything a seed or a setting controls ...
MATCH = ("arch", "dataset", "workload", "noise", "replica", "seed_init", "seed_order", "seed_augment")
# ... but run on a different stack: another device, tooling setting or software stack.
STACK = ("accelerator", *TOOLING, "fingerprint_id")
FORMATS = ("md", "csv", "parquet")
CHUNK = 1 << 23  # float64 weight values held at once, across all runs of a group (64 MiB)
# Pairwise L2 costs O(R²) memory and R² dot products: above this many runs a group's l2 is the mean
# over the pairs of a seeded random subset of this size, an unbiased estimate of the all-pairs mean.
L2_MAX_RUNS = 256
SCALARS = ["run_id", "arch", "dataset", "noise", "replica", "seed_init", "seed_order", "seed_augment",
           "accelerator_requested", "accelerator", "fingerprint_id", *TOOLING, "spec_json",
           "status", "test_accuracy", "weights_sha256", "weights_norm", "train_seconds"]
LISTS = ["predictions", "per_class_accuracy"]
REQUIRED = ("status", "arch", "dataset", "noise")  # a run row without one of these fits no group
NUMPY_FLOATS = {"F16", "F32", "F64"}  # safetensors dtypes numpy reads; BF16 and F8_* go via torch

VARIANCE = ["accelerator", "n_fingerprints", "n_runs", "n_failed", "n_test", "acc_mean", "acc_std",
            "acc_std_lo", "acc_std_hi", "acc_std_sampling", "acc_std_dist", "acc_std_dist_lo",
            "acc_std_dist_hi", "churn", "l2", "l2_rel",
            "l2_buffers", "identical_fraction", "per_class_std_max", "per_class_std_mean", "worst_class",
            "subgroup_acc_std_max", "p_vs_control", "p_vs_algo", "p_vs_control_adj", "p_vs_algo_adj",
            "train_seconds_mean", "note"]
SUBGROUPS = ["subgroup", "n_examples", "n_runs", "acc_mean", "acc_std", "fpr_mean", "fpr_std",
             "fnr_mean", "fnr_std"]
CROSS_STACK = ["arch", "dataset", "workload", "noise", *(f"{c}_a" for c in STACK), *(f"{c}_b" for c in STACK),
               "n_pairs", "identical_fraction", "churn", "n_pairs_churn", "l2", "l2_rel", "acc_diff_mean",
               "acc_diff_signed_mean", "n_pairs_l2"]
# Overhead: grouped like the variance table (workload hash, tooling values), per accelerator;
# probe rows record every axis too (world_size always 1; num_threads with the fingerprint).
PROBE_TOOLING = tuple(TOOLING)
PROBE_MODES = tuple(dict.fromkeys(m for modes in metrics.COST_PARTS.values() for m in modes))
OPS_DIR = "overhead/ops"  # where probes write their profiles (orchestrator/probe.py)
TOP_OPS = 10  # ops per group in overhead_ops
KEY_ORDER = ["arch", "dataset", "workload", *TOOLING, "accelerator", "accelerator_requested"]
OVERHEAD = ["arch", "workload", "accelerator", "accelerator_requested", "method", "n_probes", "n_fingerprints",
            "step_ms_nondet", "step_ms_det_nofill", "step_ms_det", "epoch_s_nondet", "epoch_s_det",
            "overhead_pct", "overhead_lo", "overhead_hi", "overhead_kernels_pct", "overhead_kernels_lo",
            "overhead_kernels_hi", "overhead_fill_pct", "overhead_fill_lo", "overhead_fill_hi",
            "overhead_inductor_pct", "overhead_inductor_lo", "overhead_inductor_hi", "n_pairs", "n_steps",
            "n_steps_det", "n_steps_nondet", "n_epochs", "nondeterministic_ops", "note"]
OVERHEAD_OPS = ["op", "clock", "n_probes", "ms_nondet", "ms_det", "delta_ms", "calls_nondet", "calls_det",
                "nondeterministic_ops"]
REPLICAS_NOTE = ("control vs impl replicas' epoch times, epoch 1 (warm-up) left out; the two modes ran in "
                 "separate Tune runs (separate worker pools), so drift between them is not cancelled: noisier "
                 "than a probe")


@dataclass(frozen=True)
class Runs:
    """Run rows: scalar columns as a DataFrame (index = row position), list columns kept in Arrow
    so that 400 × 50,000 predictions never become Python objects."""

    meta: pd.DataFrame
    lists: pa.Table

    def matrix(self, column: str, rows) -> np.ndarray | None:
        """(len(rows), L) array of a list column; None if a value is missing or lengths differ."""
        arr = self.lists[column].take(pa.array(np.asarray(rows, dtype=np.int64))).combine_chunks()
        if len(arr) == 0 or arr.null_count:
            return None
        lengths = pc.list_value_length(arr).to_numpy()
        if (lengths != lengths[0]).any():
            return None
        return arr.flatten().to_numpy(zero_copy_only=False).reshape(len(arr), -1)

    def present(self, column: str, rows) -> np.ndarray:
        """(len(rows),) bool: which rows have a value in a list column."""
        arr = self.lists[column].take(pa.array(np.asarray(rows, dtype=np.int64)))
        return pc.is_valid(arr).to_numpy(zero_copy_only=False)


class WeightsUnavailable(ValueError):
    """A group's weight files are missing or do not describe the same model."""


class WeightsDamaged(WeightsUnavailable):
    """Weight files whose bytes no longer match their run's weights_sha256."""

    def __init__(self, run_ids: list[str]):
        super().__init__(f"damaged weights file(s) {', '.join(run_ids)} (bytes do not match weights_sha256): left "
                         "out; their runs are marked failed and a resumed sweep runs them again")
        self.run_ids = run_ids


# safetensors dtype codes as torch names them: the runner's digest hashes str(tensor.dtype)
_TORCH_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
                 "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
                 "U8": "uint8", "U16": "uint16", "U32": "uint32", "U64": "uint64", "BOOL": "bool"}


def file_digest(path: str) -> str | None:
    """weights_sha256 recomputed from a safetensors file's own bytes, as the runner's weights_digest
    makes it (each tensor's name, torch dtype, shape and raw bytes in sorted-name order), without
    torch; None when the file cannot even be parsed."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
            h = hashlib.sha256()
            for name in sorted(k for k in header if k != "__metadata__"):
                t = header[name]
                a, b = t["data_offsets"]
                h.update(f"{name}|torch.{_TORCH_DTYPES[t['dtype']]}|{tuple(t['shape'])}|".encode())
                f.seek(8 + n + a)
                h.update(f.read(b - a))
            return h.hexdigest()
    except (OSError, ValueError, KeyError, TypeError, MemoryError, OverflowError):
        return None


class UsageError(ValueError):
    """A request the tables cannot answer, such as grouping on a column runs do not have."""


# --- reading ----------------------------------------------------------------------------------

def _spec(spec_json: object) -> dict:
    """The RunSpec a row ran, as a dict; {} when the row has none (spec_json came after DESIGN.md's
    columns, so older writers and other tools leave it null) or it is not a JSON object."""
    try:
        spec = json.loads(spec_json) if isinstance(spec_json, str) and spec_json else {}
    except json.JSONDecodeError:
        return {}
    return spec if isinstance(spec, dict) else {}


def workload_id(spec: dict) -> str:
    """Short hash of the training settings of a run (lr, epochs, batch size, arch_args, ...).
    `replicas` only says how many runs there are, so it is left out. "" without settings."""
    workload = spec.get("workload")
    w = {k: v for k, v in workload.items() if k != "replicas"} if isinstance(workload, dict) else {}
    return hashlib.sha256(json.dumps(w, sort_keys=True).encode()).hexdigest()[:8] if w else ""


def load_runs(out_uri: str, columns: Sequence[str] = (), lists: Sequence[str] = LISTS) -> Runs:
    """The one reader of run rows (the tables and the report both use it): SCALARS plus `columns`
    as a DataFrame, the list columns `lists` kept in Arrow, and the derived `workload` column.

    Only DESIGN.md's columns are required; a column added since (spec_json, the tooling axes, ...)
    reads back null where a row lacks it. A row written for a worker that died has no fingerprint;
    its tooling values are taken from its spec so it lands in its group, and a row written before
    an axis existed (null where other rows record it) gets the axis's default. A row without a column
    every table needs (REQUIRED) cannot be placed: it is left out and counted in one warning.
    Rows come sorted by run_id, not in the order files were listed or compacted."""
    scalars = [c for c in dict.fromkeys([*SCALARS, *columns]) if c != "workload" and c not in LISTS]
    table = store.read_runs(out_uri, columns=[*scalars, *lists])
    # one row order whatever the files and compaction: every table is the same for the same runs
    table = table.take(pc.sort_indices(table, [("run_id", "ascending")])).combine_chunks()  # 1 chunk: fast take()
    usable = np.logical_and.reduce([pc.is_valid(table[c]).to_numpy() for c in REQUIRED])
    skipped = int(np.count_nonzero(~usable))
    if skipped:
        table = table.filter(pa.array(usable))
        warnings.warn(f"skipped {skipped} run row(s) without {', '.join(REQUIRED[:-1])} or {REQUIRED[-1]}",
                      stacklevel=2)
    ints = {pa.int32(): pd.Int32Dtype(), pa.int64(): pd.Int64Dtype(), pa.bool_(): pd.BooleanDtype()}
    meta = table.drop_columns(list(lists)).to_pandas(types_mapper=ints.get)
    specs = [_spec(s) for s in meta["spec_json"]]
    meta["workload"] = [workload_id(s) for s in specs]
    # a dead worker's row has its spec; a row older than an axis ran at its default
    for column, axis in TOOLING.items():
        meta[column] = meta[column].fillna(
            pd.Series([axis.cell(s.get(axis.name)) for s in specs], index=meta.index, dtype=meta[column].dtype))
        if meta[column].notna().any():
            meta[column] = meta[column].fillna(axis.cell(axis.default))
    return Runs(meta, table.select(list(lists)))


def _labels(fs: pafs.FileSystem, root: str, dataset: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(labels, subgroup ids) of a dataset's test set, or None if the runs never wrote them."""
    path = store.labels_path(root, dataset)
    if not store.exists(fs, path):
        return None
    t = pq.read_table(path, filesystem=fs)
    return t["label"].to_numpy(), t["subgroup"].to_numpy()


class _Weights:
    """One run's safetensors file, read a slice at a time through a memory map. numpy has no
    bfloat16 or float8, so tensors of those types go through torch, imported only then.

    The runner writes metadata {"buffers": "<JSON list of buffer names>"}: BN running statistics
    and other buffers are not parameters, so distances keep them apart. A file without that key
    (older trees) has `buffers` None and every float tensor counts as a parameter."""

    def __init__(self, path: str):
        self.path, self.np, self._pt = path, safe_open(path, framework="numpy"), None
        try:
            names = json.loads((self.np.metadata() or {})["buffers"])
        except (KeyError, TypeError, json.JSONDecodeError):
            names = None
        self.buffers = frozenset(names) if isinstance(names, list) else None

    def float_tensors(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """name -> (dtype, shape) of the floating-point tensors."""
        out = {}
        for name in self.np.keys():
            s = self.np.get_slice(name)
            if s.get_dtype().startswith(("F", "BF")):
                out[name] = (s.get_dtype(), tuple(s.get_shape()))
        return out

    def rows(self, name: str, dtype: str, shape: tuple[int, ...], start: int, stop: int) -> np.ndarray:
        """Leading-dimension rows [start, stop) of a tensor, flattened to float64."""
        if dtype in NUMPY_FLOATS:
            x = self.np.get_slice(name)[start:stop] if shape else self.np.get_tensor(name)
            return np.asarray(x, dtype=np.float64).reshape(-1)
        import torch

        self._pt = self._pt or safe_open(self.path, framework="pt")
        x = self._pt.get_slice(name)[start:stop] if shape else self._pt.get_tensor(name)
        return x.to(torch.float64).numpy().reshape(-1)


def _tensor_sq_dists(files: list[_Weights], name: str, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """(R, R) squared distances over one tensor, in slices of leading rows so that only about
    CHUNK values of all R runs together are in memory, however large the tensor."""
    d2 = np.zeros((len(files), len(files)))
    row = math.prod(shape[1:]) if shape else 1
    step = max(1, CHUNK // (len(files) * max(row, 1)))
    for start in range(0, shape[0] if shape else 1, step):
        stop = min(start + step, shape[0] if shape else 1)
        d2 += metrics.sq_dists(np.stack([f.rows(name, dtype, shape, start, stop) for f in files]))
    return d2


def _weights_sq_dists(paths: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(R, R) squared L2 distances between the runs' final weights: over the float parameters,
    and over the float buffers (all NaN when a file does not say which tensors are buffers, or the
    model has no float buffer: a distance over nothing is undefined, not 0). Streamed one tensor
    at a time; a single file is only opened for its header (every distance is 0)."""
    files = [_Weights(p) for p in paths]
    tensors, buffers = files[0].float_tensors(), files[0].buffers
    if any(f.float_tensors() != tensors or f.buffers != buffers for f in files[1:]):
        raise WeightsUnavailable("weight files differ in tensor names, shapes, dtypes or buffers")
    d2 = {"parameters": np.zeros((len(files), len(files))), "buffers": np.zeros((len(files), len(files)))}
    for name, (dtype, shape) in sorted(tensors.items()) if len(files) > 1 else ():
        d2["buffers" if buffers and name in buffers else "parameters"] += _tensor_sq_dists(files, name, dtype, shape)
    has_buffers = buffers is not None and any(name in buffers for name in tensors)
    return d2["parameters"], d2["buffers"] if has_buffers else np.full_like(d2["buffers"], np.nan)


def l2_matrix(fs: pafs.FileSystem, root: str, runs: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(R, R) L2 distances between the final weights of `runs`: over parameters, and over
    buffers (NaN for files without the buffers metadata or models without float buffers). Runs
    with equal weights_sha256 (a digest of every tensor of the file) are bitwise equal: each
    distinct digest is read once and equal ones are 0 without looking (a control group on one
    machine costs one file header, not R files; without that file its buffer distance is unknown).
    Remote files are copied to a local temp folder first, since safetensors reads through mmap.
    Each file read is checked against its run's weights_sha256 first (WeightsDamaged)."""
    digest = runs["weights_sha256"].fillna(runs["run_id"]).to_numpy(dtype=object)
    firsts, inverse = np.unique(digest, return_index=True, return_inverse=True)[1:]
    ids = runs["run_id"].to_numpy(dtype=object)[firsts]
    paths = [store.weights_path(root, r) for r in ids]
    missing = [r for r, p in zip(ids, paths) if not store.exists(fs, p)]
    if len(ids) == 1 and missing:
        return np.zeros((len(runs), len(runs))), np.full((len(runs), len(runs)), np.nan)
    if missing:
        raise WeightsUnavailable(f"no weights file for {len(missing)} run(s), e.g. {missing[0]}")
    with tempfile.TemporaryDirectory() as tmp:
        if not store.is_local(fs):
            local = [f"{tmp}/{r}.safetensors" for r in ids]
            for src, dst in zip(paths, local):
                pafs.copy_files(src, dst, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
            paths = local
        expected = runs["weights_sha256"].to_numpy(dtype=object)[firsts]
        damaged = [r for r, p, d in zip(ids, paths, expected) if isinstance(d, str) and file_digest(p) != d]
        if damaged:
            raise WeightsDamaged(damaged)
        try:
            d2 = _weights_sq_dists(paths)
        except SafetensorError as e:
            raise WeightsUnavailable(f"unreadable weights file: {e}") from None
    return tuple(np.sqrt(d)[np.ix_(inverse, inverse)] for d in d2)


# --- variance ---------------------------------------------------------------------------------

def _accuracy_stats(acc: np.ndarray, correct: np.ndarray | None, floor_var: float = 0.0) -> dict:
    """Mean and std of the replicas' accuracies with the std's interval (metrics.std_ci: Bonett's
    from 5 replicas, chi-square below), and, when the labels give per-example correctness (R, N),
    the split of the variance into independent per-example flips (acc_std_sampling) and the
    distribution-wise rest (acc_std_dist, Jordan 2023).
    The rest's variance can be estimated below 0; its std and interval ends are sqrt(max(v, 0)).
    `floor_var`: metrics.tie_var for runs whose weights differ (0 for identical weights)."""
    lo, hi = metrics.std_ci(acc, floor_var=floor_var)
    dist = metrics.distribution_var(correct) if correct is not None else (math.nan,) * 3
    d, d_lo, d_hi = (math.sqrt(max(v, 0.0)) if not math.isnan(v) else math.nan for v in dist)
    return {"acc_mean": float(acc.mean()) if len(acc) else math.nan, "acc_std": metrics.sample_std(acc),
            "acc_std_lo": lo, "acc_std_hi": hi,
            "acc_std_sampling": metrics.per_example_std(correct) if correct is not None else math.nan,
            "acc_std_dist": d, "acc_std_dist_lo": d_lo, "acc_std_dist_hi": d_hi}


def _weight_stats(fs: pafs.FileSystem, root: str, ok: pd.DataFrame, notes: list[str]) -> dict:
    """identical_fraction, l2 (mean pairwise distance over parameters), l2_rel (l2 over the mean
    weights_norm, which the runner takes over parameters too) and l2_buffers (over BN running
    statistics and other float buffers, apart) of a group's ok runs; a run without a digest
    counts as equal to no other. Groups above L2_MAX_RUNS runs take l2 and l2_buffers from a
    subset of runs drawn with a fixed seed from the run ids in sorted order (reproducible), and say so."""
    out = {"identical_fraction": metrics.equal_pair_fraction(ok["weights_sha256"].fillna(ok["run_id"]).tolist()),
           "l2": math.nan, "l2_rel": math.nan, "l2_buffers": math.nan}
    if len(ok) < 2:
        return out
    sample = ok.sort_values("run_id")
    if len(sample) > L2_MAX_RUNS:
        sample = sample.iloc[np.sort(np.random.default_rng(0).choice(len(sample), L2_MAX_RUNS, replace=False))]
        notes.append(f"l2: mean over the pairs of a seeded sample of {L2_MAX_RUNS} of {len(ok)} runs")
    try:
        out["l2"], out["l2_buffers"] = map(metrics.mean_over_pairs, l2_matrix(fs, root, sample))
    except WeightsDamaged as e:
        notes.append(f"l2: {e}")
        for run_id in e.run_ids:
            store.amend_run(fs, root, run_id, status="failed", error=f"damaged weights file: {e}")
    except WeightsUnavailable as e:
        notes.append(f"l2: {e}")
    out["l2_rel"] = out["l2"] / ok["weights_norm"].mean()
    return out


def _subgroup_rows(preds: np.ndarray, labels: np.ndarray, subgroups: np.ndarray, key: dict) -> list[dict]:
    """Per subgroup id >= 0: accuracy mean/std across runs and, on a binary task, the false-
    positive and false-negative rates (fairness metrics move more than top-1 accuracy)."""
    binary = labels.max() <= 1
    rows = []
    for s in np.unique(subgroups[subgroups >= 0]):
        m = subgroups == s
        acc = (preds[:, m] == labels[m]).mean(axis=1)
        fpr, fnr = (metrics.binary_rates(preds[:, m], labels[m]) if binary
                    else (np.full(len(preds), np.nan),) * 2)
        rows.append({**key, "subgroup": int(s), "n_examples": int(m.sum()), "n_runs": len(preds),
                     "acc_mean": float(acc.mean()), "acc_std": metrics.sample_std(acc),
                     "fpr_mean": float(fpr.mean()), "fpr_std": metrics.sample_std(fpr),
                     "fnr_mean": float(fnr.mean()), "fnr_std": metrics.sample_std(fnr)})
    return rows


def _distinct(df: pd.DataFrame, column: str) -> str:
    """The distinct non-empty values of a column, sorted and joined; "" if there is no such column."""
    return ", ".join(sorted(str(v) for v in df[column].dropna().unique() if v != "")) if column in df else ""


def no_effect_note(ok: pd.DataFrame) -> str | None:
    """A preset whose sources changed seeds across replicas but gave bitwise-identical weights: the
    training never drew from those sources (e.g. the user's code ignores ctx.generator("order")), so
    the group measures nothing; said rather than shown as a spread of zero."""
    weights = ok["weights_sha256"] if "weights_sha256" in ok else pd.Series(dtype=object)
    if len(ok) < 2 or weights.isna().any() or weights.nunique() != 1:
        return None
    varied = [c.removeprefix("seed_") for c in ("seed_init", "seed_order", "seed_augment", "seed_bitflip")
              if c in ok and ok[c].nunique() > 1]
    if not varied:
        return None
    return (f"no effect: {', '.join(varied)} seeds changed but the weights are identical (check that the "
            "training draws from them: ctx.seed / ctx.generator in your own code)")


def _group(runs: Runs, key: dict, g: pd.DataFrame, fs, root: str, labels) -> tuple[dict, list[dict]]:
    """One variance row and its subgroup rows."""
    ok = g[g["status"] == "ok"]
    notes = [] if len(ok) >= 2 else [f"{len(ok)} ok run(s): spreads need 2"]
    notes += [n for n in [no_effect_note(ok)] if n]
    if ok["fingerprint_id"].nunique() > 1:
        notes.append("runs span several stacks (n_fingerprints): the spread includes their differences")
    preds = runs.matrix("predictions", ok.index)
    if len(ok) and preds is None:
        notes.append("predictions missing or of unequal length")
    n_test = preds.shape[1] if preds is not None else 0
    if labels is not None and preds is not None and len(labels[0]) != n_test:
        notes.append(f"labels file has {len(labels[0])} examples, predictions {n_test}: "
                     "no per-example std, no subgroups")
        labels = None
    elif labels is None and preds is not None:
        notes.append("no labels file under OUT/datasets: no per-example std")
    correct = preds == labels[0] if labels is not None and preds is not None else None
    acc = ok["test_accuracy"].dropna().to_numpy(float)
    exact = metrics.identical(ok["weights_sha256"].tolist())
    if not exact and len(acc) >= 2 and np.ptp(acc) == 0:
        notes.append(f"accuracies tie at the test set's resolution (1/{n_test}) but weights differ: "
                     "not an exact zero, acc_std_hi is what the tie can hide")
    row = {"accelerator": _distinct(ok, "accelerator"), "n_fingerprints": ok["fingerprint_id"].nunique(),
           "n_runs": len(ok), "n_failed": len(g) - len(ok), "n_test": n_test,
           **_accuracy_stats(acc, correct, 0.0 if exact else metrics.tie_var(n_test)),
           "churn": metrics.churn(preds) if preds is not None else math.nan,
           **_weight_stats(fs, root, ok, notes)}
    per_class = runs.matrix("per_class_accuracy", ok.index)
    row["per_class_std_max"], row["per_class_std_mean"], row["worst_class"] = (
        metrics.per_class_spread(per_class) if per_class is not None else (math.nan, math.nan, None))
    subs = _subgroup_rows(preds, *labels, key) if correct is not None and len(ok) >= 2 else []
    row["subgroup_acc_std_max"] = max((s["acc_std"] for s in subs), default=math.nan)
    row["train_seconds_mean"] = ok["train_seconds"].mean()  # wall time per ok run; NaN in rows without it
    row["note"] = "; ".join(notes)
    return row | key, subs


def variance_p(a: pd.Series, b: pd.Series) -> tuple[float, str]:
    """p-value that two groups' accuracy variances differ, and which test gave it. a, b: ok
    accuracies indexed by replica. Replica r of algo, algo+impl and the single-source presets
    share seeds (common random numbers), so groups pair by replica index: the paired
    Brown–Forsythe test (metrics.paired_scale_p, which keeps its size when a few replicas diverge)
    on the replicas both have. Brown–Forsythe (independent groups) only when they cannot be paired:
    a replica index repeats within a group (--by pooled several settings) or fewer than 3 are shared;
    NaN, the note says so, below metrics.BF_MIN replicas a group."""
    shared = a.index.intersection(b.index)
    if a.index.is_unique and b.index.is_unique and len(shared) >= 3:
        if len(shared) < 4:  # the sign-flip test's smallest p at 3 pairs is 0.25: it cannot reject
            return math.nan, f"paired Brown–Forsythe: too few pairs ({len(shared)}; 4 needed)"
        p = metrics.paired_scale_p(a[shared].to_numpy(), b[shared].to_numpy())
        return p, f"paired Brown–Forsythe, {len(shared)} pairs"
    unique = a.index.is_unique and b.index.is_unique
    why = f"{len(shared)} shared replicas" if unique else "replica indices repeat"
    if min(len(a), len(b)) < metrics.BF_MIN:  # at 4 a group it rejected 7-10% of equal variances
        why += f"; too few replicas ({len(a)} and {len(b)}; {metrics.BF_MIN} a group needed)"
    return metrics.brown_forsythe_p(a.to_numpy(), b.to_numpy()), f"Brown–Forsythe, unpaired: {why}"


def _significance(table: pd.DataFrame, accs: list[pd.Series], by: list[str]) -> None:
    """p_vs_control / p_vs_algo: `variance_p` of a group's accuracies against the group with the
    same key but noise control / algo, the test named in the note. NaN when there is no such
    group or the group is that group."""
    table["p_vs_control"] = table["p_vs_algo"] = table["p_vs_control_adj"] = table["p_vs_algo_adj"] = math.nan
    if "noise" not in by:
        return
    rest = [tuple(str(v) for v in vals) for vals in table[[c for c in by if c != "noise"]].itertuples(index=False)]
    where = {(r, n): i for i, (r, n) in enumerate(zip(rest, table["noise"]))}
    notes = [[n] if n else [] for n in table["note"]]
    for col, ref in (("p_vs_control", "control"), ("p_vs_algo", "algo")):
        ps = []
        for i, (r, n) in enumerate(zip(rest, table["noise"])):
            p, test = variance_p(accs[i], accs[where[(r, ref)]]) if n != ref and (r, ref) in where else (math.nan, "")
            ps.append(p)
            if test:
                notes[i].append(f"{col}: {test}")
        table[col] = ps
        table[f"{col}_adj"] = metrics.holm(ps)  # the family: this column's rows (docs/tables.md)
    table["note"] = ["; ".join(n) for n in notes]


def variance_tables(runs: Runs, fs: pafs.FileSystem, root: str, by: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The variance table (one row per group of `by`) and the subgroups table (one row per group
    and subgroup id, for datasets whose labels file defines subgroups)."""
    rows, subs, accs, labels = [], [], [], {}
    for vals, g in runs.meta.groupby(by, dropna=False, sort=True):
        key = dict(zip(by, vals))
        names = {store.labels_name(_spec(s).get("workload") or {"dataset": d})
                 for s, d in zip(g["spec_json"], g["dataset"])}
        name = names.pop() if len(names) == 1 else None  # one dataset as defined (name, root, options)
        if name is not None and name not in labels:  # trees written before labels were keyed: by name only
            labels[name] = _labels(fs, root, name) or _labels(fs, root, g["dataset"].iloc[0])
        row, sub = _group(runs, key, g, fs, root, labels.get(name))
        rows.append(row)
        subs += sub
        ok = g[(g["status"] == "ok") & g["test_accuracy"].notna()]
        accs.append(pd.Series(ok["test_accuracy"].to_numpy(float), index=ok["replica"].to_numpy()))
    extra = [c for c in VARIANCE if c not in by]
    variance = pd.DataFrame(rows, columns=by + extra)
    _significance(variance, accs, by)
    variance["worst_class"] = variance["worst_class"].astype("Int64")
    variance.attrs["message"] = "no runs under OUT/runs"
    subgroups = pd.DataFrame(subs, columns=by + SUBGROUPS)
    subgroups.attrs["message"] = "no dataset under OUT/datasets defines subgroups (subgroup id >= 0)"
    return variance, subgroups


# --- cross-stack ------------------------------------------------------------------------------

def _stack_pairs(ok: pd.DataFrame, stack: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions (a, b) in `ok` of every pair of runs equal in MATCH that ran on different stacks
    (`stack`: a code per run, ordered like the stacks, so that side a is always the lower one)."""
    a, b = [], []
    for rows in ok.groupby(list(MATCH), dropna=False, sort=True).indices.values():
        for i, j in itertools.combinations(rows, 2):
            if stack[i] != stack[j]:
                low, high = (i, j) if stack[i] < stack[j] else (j, i)
                a.append(low)
                b.append(high)
    return np.array(a, dtype=np.int64), np.array(b, dtype=np.int64)


def _pair_churn(runs: Runs, ok: pd.DataFrame, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per pair, the fraction of test predictions that differ; one prediction matrix per dataset
    (test sets of different datasets differ in length). NaN for a pair where a run has no
    predictions (and for the whole dataset when their lengths differ)."""
    churn = np.full(len(a), np.nan)
    datasets = ok["dataset"].to_numpy(dtype=object)[a]
    for name in pd.unique(datasets):
        rows = np.unique(np.concatenate([a[datasets == name], b[datasets == name]]))
        rows = rows[runs.present("predictions", ok.index[rows])]
        sel = (datasets == name) & np.isin(a, rows) & np.isin(b, rows)
        preds = runs.matrix("predictions", ok.index[rows])
        if preds is not None:
            ia, ib = np.searchsorted(rows, a[sel]), np.searchsorted(rows, b[sel])
            churn[sel] = (preds[ia] != preds[ib]).mean(axis=1)
    return churn


def _pair_l2(fs: pafs.FileSystem, root: str, ok: pd.DataFrame, a: np.ndarray, b: np.ndarray,
             groups: np.ndarray) -> np.ndarray:
    """Per pair, the L2 distance of the final parameters, for at most L2_MAX_RUNS pairs of each
    table row (`groups`), drawn with a fixed seed: each pair of different digests reads two weight
    files (equal digests are 0 unread). NaN elsewhere."""
    l2 = np.full(len(a), np.nan)
    rng = np.random.default_rng(0)
    digest = ok["weights_sha256"].to_numpy(dtype=object)
    for members in pd.Series(np.arange(len(a))).groupby(groups, sort=True).indices.values():
        if len(members) > L2_MAX_RUNS:
            members = np.sort(rng.choice(members, L2_MAX_RUNS, replace=False))
        for k in members:
            if pd.notna(digest[a[k]]) and digest[a[k]] == digest[b[k]]:
                l2[k] = 0.0
                continue
            try:
                l2[k] = l2_matrix(fs, root, ok.iloc[[a[k], b[k]]])[0][0, 1]
            except WeightsUnavailable:
                pass
    return l2


def cross_stack_table(runs: Runs, fs: pafs.FileSystem, root: str) -> pd.DataFrame:
    """Runs with the same seeds and settings that differ only in accelerator or tooling (thread
    count, fingerprint), compared pair by pair: the noise no seed removes. One row per
    (workload, noise, stack a, stack b) with the pair means; `l2` over at most L2_MAX_RUNS pairs
    of a row (`n_pairs_l2`), `churn` over the pairs with predictions on both sides
    (`n_pairs_churn`), the rest over every pair. `acc_diff_mean` is the mean *absolute* accuracy
    difference of a pair (how far a stack moves a run), `acc_diff_signed_mean` the mean of
    accuracy a - accuracy b (whether one stack is better)."""
    ok = runs.meta[runs.meta["status"] == "ok"]
    stack = ok.groupby(list(STACK), dropna=False, sort=True).ngroup().to_numpy()
    a, b = _stack_pairs(ok, stack)
    keys = CROSS_STACK[:CROSS_STACK.index("n_pairs")]
    if len(a):
        col = {c: ok[c].to_numpy(dtype=object) for c in ("arch", "dataset", "workload", "noise", *STACK)}
        digest = ok["weights_sha256"].to_numpy(dtype=object)
        norm, acc = ok["weights_norm"].to_numpy(float), ok["test_accuracy"].to_numpy(float)
        pairs = pd.DataFrame({**{c: col[c][a] for c in ("arch", "dataset", "workload", "noise")},
                              **{f"{c}_a": col[c][a] for c in STACK}, **{f"{c}_b": col[c][b] for c in STACK},
                              "identical": pd.notna(digest[a]) & (digest[a] == digest[b]),
                              "churn": _pair_churn(runs, ok, a, b), "norm": (norm[a] + norm[b]) / 2,
                              "acc_diff": np.abs(acc[a] - acc[b]), "acc_diff_signed": acc[a] - acc[b]})
        pairs["l2"] = _pair_l2(fs, root, ok, a, b, pairs.groupby(keys, dropna=False, sort=True).ngroup().to_numpy())
        df = pairs.groupby(keys, dropna=False, sort=True).agg(
            n_pairs=("churn", "size"), identical_fraction=("identical", "mean"), churn=("churn", "mean"),
            n_pairs_churn=("churn", "count"), l2=("l2", "mean"), n_pairs_l2=("l2", "count"), norm=("norm", "mean"),
            acc_diff_mean=("acc_diff", "mean"), acc_diff_signed_mean=("acc_diff_signed", "mean")).reset_index()
        df["l2_rel"] = df["l2"] / df["norm"]
        table = df[CROSS_STACK]
    else:
        table = pd.DataFrame(columns=CROSS_STACK)
    table.attrs["message"] = ("no matched runs on different stacks (same seeds and settings, different "
                              "accelerator or num_threads); sweep a tooling axis to fill this table")
    return table


# --- overhead ---------------------------------------------------------------------------------

def _fill_off_det(df: pd.DataFrame) -> pd.DataFrame:
    """Probe files from before the probe timed the fill apart ran `det` blocks without the NaN fill
    under `fill_uninitialized_memory: false` (impl_flags say so): those blocks are det_nofill."""
    if "impl_flags" in df:
        fill = {f: _spec(f).get("fill_uninitialized_memory") for f in df["impl_flags"].dropna().unique()}
        df.loc[(df["mode"] == "det") & df["impl_flags"].map(fill).eq(False), "mode"] = "det_nofill"
    return df


def _read_folder(fs: pafs.FileSystem, folder: str, needed: set[str]) -> pd.DataFrame | None:
    """Every Parquet file of a folder as one frame, with `probe_id` (from the file name where a file
    lacks it); files without the `needed` columns are skipped with a warning that counts them."""
    frames, skipped = [], 0
    for path in store.list_files(fs, folder, ".parquet"):
        try:
            df = pq.read_table(path, filesystem=fs).to_pandas()
        except (pa.ArrowException, OSError):
            skipped += 1
            continue
        if not needed <= set(df.columns):
            skipped += 1
            continue
        if "probe_id" not in df:
            df["probe_id"] = path.rsplit("/", 1)[-1].removesuffix(".parquet")
        frames.append(df)
    if skipped:
        warnings.warn(f"skipped {skipped} unreadable or foreign Parquet file(s) under {folder}", stacklevel=3)
    if not frames:
        return None
    df = pd.concat(frames, ignore_index=True)
    specs = df["spec_json"] if "spec_json" in df else [None] * len(df)
    return df.assign(workload=[workload_id(_spec(s)) for s in specs])


def _read_probes(fs: pafs.FileSystem, root: str) -> pd.DataFrame | None:
    """All determinism-overhead probe step rows, with their workload hash."""
    probes = _read_folder(fs, f"{root}/overhead", {"arch", "accelerator", "mode", "step_ms"})
    return None if probes is None else _fill_off_det(probes)


def _probe_keys(df: pd.DataFrame) -> list[str]:
    """Grouping keys of probe rows: arch, dataset and workload hash, the tooling values probes
    recorded (a column no probe filled, cudnn_benchmark in older trees, is not a key), accelerator."""
    tooling = [c for c in PROBE_TOOLING if c in df and df[c].notna().any()]
    return ["arch", *(["dataset"] if "dataset" in df else []), "workload", *tooling, "accelerator"]


def _blocks(g: pd.DataFrame) -> tuple[dict[str, list[np.ndarray]], int]:
    """The step times of each mode the group timed, one array per complete repeat (probe_id,
    repeat: one block of every such mode) in matching order, and how many incomplete repeats were
    left out. Probe files from before the `repeat` column had two modes, blocks 2r and 2r+1."""
    repeat = g["repeat"] if "repeat" in g else g["block"] // 2 if "block" in g else pd.Series(np.nan, g.index)
    modes = [m for m in PROBE_MODES if (g["mode"] == m).any()]
    blocks, incomplete = {m: [] for m in modes}, 0
    for _, r in g.assign(_repeat=repeat).groupby(["probe_id", "_repeat"], sort=True, dropna=False):
        times = {m: r.loc[r["mode"] == m, "step_ms"].to_numpy(float) for m in modes}
        if not all(len(t) for t in times.values()):
            incomplete += 1
            continue
        for m, t in times.items():
            blocks[m].append(t)
    return blocks, incomplete


def _cost_columns(blocks: dict[str, list[np.ndarray]]) -> dict:
    """overhead_pct and its parts (overhead_<part>_pct), each with _lo and _hi (metrics.cost_parts)."""
    columns = {}
    for part, values in metrics.cost_parts(blocks).items():
        name = "overhead" if part == "total" else f"overhead_{part}"
        columns |= dict(zip((f"{name}_pct", f"{name}_lo", f"{name}_hi"), values))
    return columns


def _median(units: list[np.ndarray]) -> float:
    return float(np.median(np.concatenate(units))) if units else math.nan


def _missing_modes(blocks: dict) -> list[str]:
    """Why a part is NaN: the modes a probe did not time."""
    if "det" in blocks and "det_nofill" not in blocks:
        return ["det and nondet blocks only (a probe written before the parts were timed): no kernels or fill part"]
    if "det" not in blocks and "det_nofill" in blocks:
        return ["no det blocks (fill_uninitialized_memory: false): the kernels part only, no total"]
    return []


def _overhead_row(key: dict, g: pd.DataFrame) -> dict:
    blocks, incomplete = _blocks(g)
    n = len(next(iter(blocks.values()), []))
    notes = [f"{incomplete} incomplete repeat(s) left out"] if incomplete else []
    if n < 2:
        notes.append(f"{n} complete repeat(s): each interval needs 2")
    notes += _missing_modes(blocks)
    n_det, n_nondet = (sum(map(len, blocks.get(m, []))) for m in ("det", "nondet"))
    return {**key, "method": "probe", "accelerator_requested": _distinct(g, "accelerator_requested"),
            "n_probes": g["probe_id"].nunique(),
            "n_fingerprints": g["fingerprint_id"].nunique() if "fingerprint_id" in g else 0,
            **{f"step_ms_{m}": _median(blocks.get(m, [])) for m in ("nondet", "det_nofill", "det")},
            **_cost_columns(blocks),
            "n_pairs": n, "n_steps": sum(len(t) for units in blocks.values() for t in units),
            "n_steps_det": n_det, "n_steps_nondet": n_nondet,
            "nondeterministic_ops": _distinct(g, "nondeterministic_ops"), "note": "; ".join(notes)}


def _epochs(seconds: list | None) -> np.ndarray:
    """A run's epoch times without the first, which also holds the warm-up (allocator, caches,
    torch.compile, a user function's set-up), when the run has more than one."""
    s = np.asarray(seconds or [], dtype=np.float64)
    return s[1:] if len(s) > 1 else s


def _replica_pairs(det: pd.DataFrame, nondet: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, str | None]:
    """The control and impl runs that share a replica index, side by side, or a reason to refuse:
    an index that repeats (settings pooled by --by), or a pair on different accelerators or stacks."""
    if det["replica"].duplicated().any() or nondet["replica"].duplicated().any():
        return det, nondet, "a replica index repeats within a mode (settings pooled by --by): cannot pair"
    shared = sorted(set(det["replica"]) & set(nondet["replica"]))
    a, b = (d.set_index("replica").loc[shared] for d in (det, nondet))
    stacks = [s["accelerator"].astype(str) + " " + s["fingerprint_id"].astype(str) for s in (a, b)]
    differ = (stacks[0].to_numpy() != stacks[1].to_numpy()).nonzero()[0]
    if len(differ):
        i = differ[0]
        return a, b, (f"refused: {len(differ)} of {len(shared)} control/impl pair(s) ran on different accelerators "
                      f"or fingerprints (replica {shared[i]}: {stacks[0].iloc[i]} vs {stacks[1].iloc[i]}); their "
                      "epoch times would compare machines, not modes")
    return a, b, None


def _replica_row(key: dict, det: pd.DataFrame, nondet: pd.DataFrame, epochs: pa.ChunkedArray) -> dict:
    """Overhead from the epoch times of control (deterministic) and impl (default kernels) replicas
    paired by replica index: the same seeds, so each pair differs only in the determinism switches."""
    a, b, refused = _replica_pairs(det, nondet)
    notes = [REPLICAS_NOTE]
    units, single = {"det": [], "nondet": []}, 0
    if refused:
        notes.append(refused)
    else:
        for i, j in zip(a["_row"], b["_row"]):
            sa, sb = epochs[int(i)].as_py() or [], epochs[int(j)].as_py() or []
            single += (len(sa) == 1) + (len(sb) == 1)
            if len(sa) and len(sb):
                units["det"].append(_epochs(sa))
                units["nondet"].append(_epochs(sb))
        if single:
            notes.append(f"{single} run(s) of one epoch: that epoch, warm-up included, is used")
        if len(units["det"]) < len(a):
            notes.append(f"{len(a) - len(units['det'])} pair(s) without epoch times left out")
        if len(units["det"]) < 2:
            notes.append(f"{len(units['det'])} pair(s): the interval needs 2")
    g = pd.concat([det, nondet])
    return {**key, "method": "replicas", "accelerator": _distinct(g, "accelerator"), "n_probes": 0,
            "n_fingerprints": g["fingerprint_id"].nunique(),
            "epoch_s_nondet": _median(units["nondet"]), "epoch_s_det": _median(units["det"]),
            **_cost_columns(units), "n_pairs": len(units["det"]),
            "n_epochs": sum(len(u) for side in units.values() for u in side), "note": "; ".join(notes)}


def _replica_rows(runs: Runs, by: Sequence[str]) -> list[dict]:
    """One row per group of the variance table (without `noise`) that has both control and impl runs."""
    meta = runs.meta.assign(_row=np.arange(len(runs.meta)))
    ok = meta[(meta["status"] == "ok") & meta["noise"].isin(["control", "impl"])]
    if ok.empty or "epoch_seconds" not in runs.lists.column_names:
        return []
    keys, rows = [c for c in by if c != "noise"], []
    for vals, g in ok.groupby(keys, sort=True, dropna=False):
        det, nondet = g[g["noise"] == "control"], g[g["noise"] == "impl"]
        if len(det) and len(nondet):
            rows.append(_replica_row(dict(zip(keys, vals)), det, nondet, runs.lists["epoch_seconds"]))
    return rows


def _ordered(columns: list[str]) -> list[str]:
    """The overhead table's columns: keys in the order of KEY_ORDER (others after them), then OVERHEAD."""
    keys = [c for c in KEY_ORDER if c in columns] + [c for c in columns if c not in KEY_ORDER and c not in OVERHEAD]
    return keys + [c for c in OVERHEAD if c not in keys]


def overhead_table(fs: pafs.FileSystem, root: str, runs: Runs | None = None,
                   by: Sequence[str] = DEFAULT_BY) -> pd.DataFrame:
    """What determinism costs, one row per workload group and method. `probe` rows: per (arch,
    workload, tooling values, accelerator), never pooled across workloads that share an arch (the
    workload hash comes from the probe's spec, as for runs); median step time per mode over the
    complete repeats, overhead_pct = det/nondet - 1 and its parts from the repeats' log ratios
    (metrics.cost_parts: Hodges–Lehmann with the signed-rank interval), a repeat one unit, so the
    drift the rotation cancels stays cancelled; fewer than 2 repeats: NaN intervals. `replicas`
    rows (when `runs` are given): per group of the variance table (`by`) without noise, from
    control and impl replicas' epoch times."""
    probes = _read_probes(fs, root)
    rows = []
    if probes is not None:
        keys = _probe_keys(probes)
        rows = [_overhead_row(dict(zip(keys, vals)), g)
                for vals, g in probes.groupby(keys, sort=True, dropna=False)]
    rows += _replica_rows(runs, by) if runs is not None else []
    columns = list(dict.fromkeys(c for r in rows for c in r)) if rows else ["arch", "workload", "accelerator"]
    table = pd.DataFrame(rows, columns=_ordered(columns))
    table.attrs["message"] = ("no determinism-overhead probes under OUT/overhead and no control/impl replica pairs; "
                              "run the overhead probe, or control and impl replicas, to fill this table")
    return table


def overhead_ops_table(fs: pafs.FileSystem, root: str, top: int = TOP_OPS) -> pd.DataFrame:
    """The `top` ops whose self time per step grows most in deterministic mode, per group of the
    overhead table's probe rows (means over its probes' profiled blocks), with the ops the group
    recorded as having no deterministic kernel beside them."""
    ops = _read_folder(fs, f"{root}/{OPS_DIR}", {"arch", "accelerator", "op", "clock", "ms_det", "ms_nondet"})
    groups = []
    if ops is not None:
        keys = _probe_keys(ops)
        for vals, g in ops.groupby(keys, sort=True, dropna=False):
            per_op = g.groupby(["op", "clock"], sort=True).agg(
                n_probes=("probe_id", "nunique"), ms_nondet=("ms_nondet", "mean"), ms_det=("ms_det", "mean"),
                calls_nondet=("calls_nondet", "mean"), calls_det=("calls_det", "mean")).reset_index()
            per_op["delta_ms"] = per_op["ms_det"] - per_op["ms_nondet"]
            groups.append(per_op.sort_values("delta_ms", ascending=False, kind="stable").head(top).assign(
                **dict(zip(keys, vals)), nondeterministic_ops=_distinct(g, "nondeterministic_ops")))
    table = (pd.concat(groups, ignore_index=True)[keys + OVERHEAD_OPS] if groups
             else pd.DataFrame(columns=["arch", "workload", "accelerator", *OVERHEAD_OPS]))
    table.attrs["message"] = "no profiled probes under OUT/overhead/ops; run the overhead probe to fill this table"
    return table


# --- output -----------------------------------------------------------------------------------

def _cell(v: object, numeric: bool) -> str:
    if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
        return "nan" if numeric else ""
    if isinstance(v, (float, np.floating)):  # whole numbers (replica counts) in full, not as 1.443e+04
        return f"{v:.0f}" if float(v).is_integer() and abs(v) < 1e15 else f"{v:.4g}"
    return str(v).replace("|", "\\|")  # a pipe in a note would split the cell


def format_markdown(df: pd.DataFrame) -> str:
    """An aligned GitHub Markdown table: numbers right-aligned at 4 significant digits, missing
    numbers as nan. An empty table gives the reason it is empty (df.attrs['message']) instead."""
    if df.empty:
        return df.attrs.get("message", "(no rows)")
    numeric = [pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c]) for c in df]
    cols = [[str(c)] + [_cell(v, num) for v in df[c].tolist()] for c, num in zip(df.columns, numeric)]
    widths = [max(3, *map(len, col)) for col in cols]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(s.rjust(w) if num else s.ljust(w)
                                 for s, w, num in zip(cells, widths, numeric)) + " |"
    rule = "|" + "|".join("-" * (w + 1) + ":" if num else ":" + "-" * (w + 1) for w, num in zip(widths, numeric))
    return "\n".join([line([c[0] for c in cols]), rule + "|"]
                     + [line([c[i] for c in cols]) for i in range(1, len(df) + 1)])


def write_tables(fs: pafs.FileSystem, root: str, tables: dict[str, pd.DataFrame], fmt=FORMATS) -> None:
    """OUT/tables/<name>.<fmt>, each written atomically (a local rename or one object PUT)."""
    for name, df in tables.items():
        base = f"{root}/tables/{name}"
        if "parquet" in fmt:
            store.write_table(fs, f"{base}.parquet", pa.Table.from_pandas(df, preserve_index=False))
        if "csv" in fmt:
            store.write_bytes(fs, f"{base}.csv", df.to_csv(index=False).encode())
        if "md" in fmt:
            store.write_bytes(fs, f"{base}.md", (format_markdown(df) + "\n").encode())


DIVERGENCE = ["epoch", "n_runs", "n_pairs", "identical_fraction", "distance", "distance_rel", "first_parting_epoch"]
DIVERGENCE_MAX_RUNS = 32  # runs of a group whose pairs are compared (the first by run_id): 496 pairs at most


def divergence_table(runs: Runs, by: list[str]) -> pd.DataFrame:
    """At which epoch runs of one group (same settings) part, and how their distance grows: per group
    and epoch, the share of run pairs whose weights are bitwise identical after that epoch, and the
    mean distance between the pairs' weight sketches (runner.weights_sketch: the same projection for
    every run of a workload, so it estimates the L2 distance of the weights), absolute and relative to
    the sketches' mean norm. `first_parting_epoch` is the first epoch (1-based) at which any pair
    differs; null while they all agree. Runs without per-epoch records (a user's function, older
    trees) are left out."""
    ok = runs.meta[(runs.meta["status"] == "ok")]
    digests = runs.lists["epoch_weights_sha256"].to_pylist()
    sketches = runs.lists["epoch_sketch"].to_pylist()
    rows = []
    for key, g in ok.groupby(by, dropna=False, sort=True):
        members = [i for i in g.index if digests[i]][:DIVERGENCE_MAX_RUNS]
        epochs = min((len(digests[i]) for i in members), default=0)
        if len(members) < 2:
            continue
        pairs = list(itertools.combinations(members, 2))
        group, parted = dict(zip(by, key if isinstance(key, tuple) else (key,))), None
        for e in range(epochs):
            same = np.mean([digests[i][e] == digests[j][e] for i, j in pairs])
            sk = {i: np.asarray(sketches[i][e]) for i in members}
            dist = float(np.mean([np.linalg.norm(sk[i] - sk[j]) for i, j in pairs]))
            norm = float(np.mean([np.linalg.norm(v) for v in sk.values()]))
            parted = parted or (e + 1 if same < 1 else None)
            rows.append({**group, "epoch": e + 1, "n_runs": len(members), "n_pairs": len(pairs),
                         "identical_fraction": float(same), "distance": dist,
                         "distance_rel": dist / norm if norm else math.nan})
        for row in rows[len(rows) - epochs:]:
            row["first_parting_epoch"] = parted
    table = pd.DataFrame(rows, columns=[*by, *DIVERGENCE])
    table["first_parting_epoch"] = table["first_parting_epoch"].astype("Int32")
    table.attrs["message"] = "no group has two runs with per-epoch weight records (built-in loop only)"
    return table


def reduce(out_uri: str, by: list[str] | None = None, fmt=FORMATS) -> dict[str, pd.DataFrame]:
    """Every table of the results tree at `out_uri`, written to OUT/tables in the formats `fmt`
    and returned by name: variance, subgroups, sources, cross_stack, overhead, overhead_ops. `by`
    overrides the variance grouping (default DEFAULT_BY)."""
    asked = list(dict.fromkeys(by or DEFAULT_BY))
    unknown = [c for c in asked if c not in store.RUN_SCHEMA.names and c != "workload"]
    if unknown or any(c in LISTS for c in asked):
        raise UsageError(f"--by: cannot group on {', '.join(unknown) or 'a list column'}; "
                         f"use run columns such as {', '.join(DEFAULT_BY)}")
    fs, root = store.resolve(out_uri)
    # epoch times: the replicas' overhead; per-epoch digests and sketches: the divergence table
    runs = load_runs(out_uri, asked, lists=[*LISTS, "epoch_seconds", "epoch_weights_sha256", "epoch_sketch"])
    # by default, a tooling axis no run recorded (results older than the axis) is not a column
    by = asked if by else [c for c in asked if c not in TOOLING or runs.meta[c].notna().any()]
    variance, subgroups = variance_tables(runs, fs, root, by)
    tables = {"variance": variance, "subgroups": subgroups,
              "sources": sources.sources_table(variance, runs.meta, runs.matrix, by),
              "cross_stack": cross_stack_table(runs, fs, root), "overhead": overhead_table(fs, root, runs, by),
              "overhead_ops": overhead_ops_table(fs, root), "divergence": divergence_table(runs, by)}
    write_tables(fs, root, tables, fmt)
    return tables


@contextlib.contextmanager
def warnings_on_stderr() -> Iterator[None]:
    """Warnings raised inside the block (skipped files, unusable rows) printed when it ends as one
    `warning: ...` line each, without the source line Python would echo."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        yield
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)


def no_tree(uri: str) -> bool:
    """True, with a one-line error, when there is no results tree at `uri` or its storage cannot
    be reached (object storage: within the store's timeouts)."""
    try:
        fs, root = store.resolve(uri)
        if store.exists(fs, root):
            return False
        print(f"error: {uri}: no such results tree", file=sys.stderr)
    except OSError as e:
        print(f"error: {store.unreachable(uri, e)}", file=sys.stderr)
    return True


def main(argv: list[str] | None = None) -> int:
    """The command line: 0 tables written, 2 bad usage or no results tree (nothing written)."""
    parser = argparse.ArgumentParser(prog="python -m orchestrator.reduce",
                                     description="Variance, cross-stack and overhead tables of a results tree.")
    parser.add_argument("out", help="results tree: local path, s3://bucket/prefix or gs://bucket/prefix")
    parser.add_argument("--by", help=f"comma-separated grouping columns (default {','.join(DEFAULT_BY)})")
    parser.add_argument("--format", default=",".join(FORMATS),
                        help="files to write under OUT/tables, comma-separated")
    args = parser.parse_args(argv)
    fmt = tuple(f.strip() for f in args.format.split(",") if f.strip())
    if not set(fmt) <= set(FORMATS):
        parser.error(f"--format: choose from {', '.join(FORMATS)}")
    if no_tree(args.out):
        return 2
    try:
        with lease.held(args.out), warnings_on_stderr():
            tables = reduce(args.out, by=args.by.split(",") if args.by else None, fmt=fmt)
    except (UsageError, lease.LeaseError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, df in tables.items():
        print(f"## {name}\n\n{format_markdown(df)}\n")
    print(f"tables written to {args.out.rstrip('/')}/tables ({', '.join(fmt)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
