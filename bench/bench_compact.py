"""Reading 10,000 run files: `python -m orchestrator.reduce` before and after
`python -m orchestrator.compact`, on the local disk and on an S3 server (moto) on 127.0.0.1.

    python bench/bench_compact.py [--runs 10000] [--examples 360] [--no-s3]

The tree is bench_reduce's (8 groups: 2 archs × {control, algo} × 2 thread counts, with weights),
with `runs / 8` replicas per group and digits-sized test sets. Per store it prints the wall time of
reduce on per-run files, of compaction, and of reduce on compacted files, plus the number of
Parquet files under runs/. Goals: reduce ≤ 10 s locally and ≤ 60 s on S3. Reduce still reads one
weights file per run for the L2 distances; the run rows are what compaction merges.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.fs as pafs

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from bench_reduce import generate  # noqa: E402

from orchestrator import store  # noqa: E402


def timed(*args: str) -> float:
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    if res.returncode:
        sys.exit(f"{' '.join(args)} failed:\n{res.stderr[-2000:]}")
    return time.perf_counter() - t0


def read_rows(out: str) -> float:
    """The part of reduce that compaction changes: reading every run row."""
    t0 = time.perf_counter()
    store.read_runs(out, columns=["run_id", "status", "test_accuracy", "predictions"])
    return time.perf_counter() - t0


def measure(label: str, out: str) -> None:
    fs, root = store.resolve(out)
    n_files = lambda: len(store.list_files(fs, f"{root}/runs", ".parquet"))  # noqa: E731
    files_before, rows_before, before = n_files(), read_rows(out), timed("orchestrator.reduce", out)
    compact = timed("orchestrator.compact", out)
    files_after, rows_after, after = n_files(), read_rows(out), timed("orchestrator.reduce", out)
    goal = 10 if label == "local" else 60
    print(f"{label:>5}: {files_before:,} run files: rows read {rows_before:6.1f} s, reduce {before:6.1f} s | "
          f"compact {compact:6.1f} s | {files_after} compacted files: rows read {rows_after:5.2f} s "
          f"({rows_before / rows_after:.0f}× faster), reduce {after:6.1f} s (goal ≤ {goal} s: "
          f"{'met' if after <= goal else 'MISSED'})", flush=True)


def s3_server():
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    fs = pafs.S3FileSystem(endpoint_override=f"{host}:{port}", scheme="http", access_key="testing",
                           secret_key="testing", region="us-east-1", allow_bucket_creation=True)
    fs.create_dir("bench")
    os.environ.update(env)  # store.resolve here and in the commands reads the endpoint from the environment
    return server, fs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=10_000)
    p.add_argument("--examples", type=int, default=360)
    p.add_argument("--no-s3", action="store_true")
    args = p.parse_args()
    print(f"machine: {os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as local:
        t0 = time.perf_counter()
        generate(local, args.runs // 8, args.examples)
        print(f"tree: {args.runs // 8 * 8:,} runs × {args.examples} predictions, with weights "
              f"({time.perf_counter() - t0:.0f} s to generate)", flush=True)
        if not args.no_s3:
            server, s3 = s3_server()
            t0 = time.perf_counter()
            pafs.copy_files(local, "bench/tree", destination_filesystem=s3, use_threads=True)
            print(f"uploaded to s3://bench/tree in {time.perf_counter() - t0:.0f} s", flush=True)
        measure("local", local)
        if not args.no_s3:
            measure("s3", "s3://bench/tree")
            server.stop()


if __name__ == "__main__":
    main()
