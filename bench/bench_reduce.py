"""Benchmark: reduce a generated results tree of 8 groups × 50 replicas × 50,000 test predictions.

    .venv/bin/python bench/bench_reduce.py [--replicas 50] [--examples 50000] [--keep DIR]

The groups are 2 archs × {control, algo} × num_threads {1, 2}, so every table has rows: control
replicas are identical within a thread count and differ across it (cross-stack pairs), algo
replicas differ everywhere. Prints the wall time and peak RSS of `python -m orchestrator.reduce`
in a fresh process (imports included, as a user runs it), then the vectorised churn of one group
beside a naive per-pair Python loop. Goal: the whole reduce under 10 s on a 2-core machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from safetensors.numpy import save

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from orchestrator import metrics, store  # noqa: E402

CLASSES, SUBGROUPS = 10, 4
SHAPES = {"fc1.weight": (64, 32), "fc1.bias": (64,), "fc2.weight": (CLASSES, 64), "fc2.bias": (CLASSES,)}


def run_table(row: dict, preds: np.ndarray, per_class: np.ndarray) -> pa.Table:
    """One run row in RUN_SCHEMA, list columns built from numpy (no 50,000-element Python lists)."""
    lists = {"predictions": preds.astype(np.int32), "per_class_accuracy": per_class}
    cols = []
    for f in store.RUN_SCHEMA:
        if f.name in lists:
            v = lists[f.name]
            cols.append(pa.ListArray.from_arrays(pa.array([0, len(v)], pa.int32()), pa.array(v, f.type.value_type)))
        else:
            cols.append(pa.array([row.get(f.name)], f.type))
    return pa.Table.from_arrays(cols, schema=store.RUN_SCHEMA)


def generate(root: str, replicas: int, n: int) -> None:
    """The results tree: runs, weights, and a labels file with subgroups."""
    fs, root = store.resolve(root)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, CLASSES, n)
    store.write_table(fs, store.labels_path(root, "bench"), pa.table(
        {"label": labels.astype(np.int32), "subgroup": (np.arange(n) % SUBGROUPS).astype(np.int32)},
        schema=store.LABELS_SCHEMA))
    for a, arch in enumerate(("mlp_a", "mlp_b")):
        truth = np.where(rng.random(n) < 0.9, labels, rng.integers(0, CLASSES, n))  # a 90% model
        base = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
        for noise, threads, r in ((x, t, r) for x in ("control", "algo") for t in (1, 2) for r in range(replicas)):
            # control: one stream per thread count (bitwise equal replicas); algo: one per replica
            g = np.random.default_rng([a, threads, r if noise == "algo" else 10**6])
            flip = g.random(n) < 0.03
            preds = np.where(flip, g.integers(0, CLASSES, n), truth)
            tensors = {k: v + 0.01 * g.normal(size=v.shape).astype(np.float32) for k, v in base.items()}
            blob = save(tensors)
            run_id = f"{arch}-{noise}-t{threads}-r{r}"
            store.write_bytes(fs, store.weights_path(root, run_id), blob)
            correct = preds == labels
            per_class = np.array([correct[labels == c].mean() for c in range(CLASSES)])
            seed = 7 if noise == "control" else 100 + r
            row = {"run_id": run_id, "sweep": "bench", "arch": arch, "dataset": "bench", "noise": noise,
                   "replica": r, "seed_init": seed, "seed_order": seed, "seed_augment": seed,
                   "accelerator_requested": "any", "accelerator": "cpu", "fingerprint_id": "fp-bench",
                   "num_threads": threads, "status": "ok", "epochs": 1, "test_accuracy": float(correct.mean()),
                   "spec_json": json.dumps({"workload": {"arch": arch, "dataset": "bench"}, "num_threads": threads}),
                   "weights_sha256": hashlib.sha256(blob).hexdigest(),
                   "weights_norm": math.sqrt(sum(float((t.astype(np.float64) ** 2).sum()) for t in tensors.values()))}
            store.write_table(fs, store.run_path(root, run_id), run_table(row, preds, per_class))


def naive_churn(preds: list[list[int]]) -> float:
    """What a first attempt looks like: every pair, every example, in Python."""
    total, pairs = 0.0, 0
    for i in range(len(preds)):
        for j in range(i + 1, len(preds)):
            total += sum(a != b for a, b in zip(preds[i], preds[j])) / len(preds[i])
            pairs += 1
    return total / pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=50)
    parser.add_argument("--examples", type=int, default=50_000)
    parser.add_argument("--keep", help="generate the tree here and keep it (default: a temp folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = args.keep or tmp
        t0 = time.perf_counter()
        generate(out, args.replicas, args.examples)
        print(f"tree: 8 groups × {args.replicas} replicas × {args.examples:,} predictions "
              f"({time.perf_counter() - t0:.1f} s to generate) in {out}")

        t0 = time.perf_counter()
        res = subprocess.run([sys.executable, "-m", "orchestrator.reduce", out, "--format", "md,csv,parquet"],
                             capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
        wall = time.perf_counter() - t0
        if res.returncode:
            sys.exit(res.stderr)
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # Linux: KiB
        print(f"python -m orchestrator.reduce: {wall:.2f} s wall (imports included), "
              f"peak RSS {peak_mb:.0f} MiB, goal < 10 s: {'met' if wall < 10 else 'MISSED'}")

        fs, root = store.resolve(out)
        runs = store.read_runs(out, columns=["run_id", "predictions"])
        rows = [i for i, r in enumerate(runs["run_id"].to_pylist()) if r.startswith("mlp_a-algo-t1-")]
        preds = np.stack([np.asarray(runs["predictions"][i].values) for i in rows])
        t0 = time.perf_counter()
        fast = metrics.churn(preds)
        t_fast = time.perf_counter() - t0
        t0 = time.perf_counter()
        pairwise = metrics.mean_over_pairs(metrics.pairwise_disagreement(preds))
        t_pairs = time.perf_counter() - t0
        as_lists = preds.tolist()
        t0 = time.perf_counter()
        slow = naive_churn(as_lists)
        t_slow = time.perf_counter() - t0
        assert math.isclose(fast, slow, rel_tol=1e-9) and math.isclose(fast, pairwise, rel_tol=1e-9)
        print(f"churn of one group ({preds.shape[0]} × {preds.shape[1]:,}) = {fast:.5f}: "
              f"vectorised {t_fast * 1e3:.1f} ms, numpy per-pair {t_pairs * 1e3:.1f} ms, "
              f"naive Python per-pair {t_slow:.2f} s -> {t_slow / t_fast:,.0f}× faster")


if __name__ == "__main__":
    main()
