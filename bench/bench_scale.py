"""Orchestrator overhead at scale: N trivial runs through `python -m orchestrator.sweep`.

    python bench/bench_scale.py [N ...]        # default: 200 2000; 10000 on request

Each run is digits × mlp × 1 epoch, noise [algo], resources {cpus: 1}: training takes tens of
milliseconds, so what is measured is the orchestrator. Per N it prints the wall time of the
command, the time until the first run finished, the slot-seconds per run in steady state
((last finish - first finish) × slots / (N - 1): everything a slot spends per run, training
included), the driver's peak RSS while the runs run and including the compaction and reduce at
the end, and at the end the growth ratio per-run(largest N)/per-run(200).
Goals on a 2-core machine: ≤ 0.15 slot-s per run at 2,000 and 10,000, first run ≤ 30 s after the
start at any N, growth ≤ 1.2, driver RSS ≤ 1.5 GB at 10,000. Note the machine's load beside a figure.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from orchestrator import store  # noqa: E402


def spec(n: int) -> dict:
    return {"name": f"scale{n}", "replicas": n, "noise": ["algo"], "resources": {"cpus": 1},
            "workloads": [{"arch": "mlp", "dataset": "digits", "epochs": 1, "batch_size": 128}]}


def sample_rss(pid: int, t0: float, samples: list[tuple[float, float]], done: threading.Event) -> None:
    """(seconds since start, MB) of the driver's resident set, twice a second."""
    while not done.wait(0.5):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return
        kb = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
        samples.append((time.perf_counter() - t0, kb / 1024))


def run(n: int, tmp: Path) -> dict:
    path = tmp / f"scale{n}.yaml"
    path.write_text(yaml.safe_dump(spec(n)))
    out = tmp / f"out{n}"
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-m", "orchestrator.sweep", str(path), "--out", str(out), "--fresh"],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    rss, done = [], threading.Event()
    threading.Thread(target=sample_rss, args=(p.pid, t0, rss, done), daemon=True).start()
    finishes = [time.perf_counter() - t0 for line in p.stdout if line.startswith("[")]
    rc = p.wait()
    wall = time.perf_counter() - t0
    done.set()
    if rc != 0 or len(finishes) != n:
        sys.exit(f"N={n}: sweep exited {rc} after {len(finishes)} of {n} runs")
    train = store.read_runs(str(out), columns=["train_seconds"])["train_seconds"].to_pylist()
    slots = os.cpu_count()
    return {"n": n, "wall": wall, "first": finishes[0], "slots": slots,
            "per_run": (finishes[-1] - finishes[0]) * slots / (n - 1), "train": sum(train) / n,
            "rss_runs": max((mb for t, mb in rss if t <= finishes[-1]), default=0),
            "rss": max((mb for _, mb in rss), default=0)}


def main() -> None:
    sizes = [int(a) for a in sys.argv[1:]] or [200, 2000]
    print(f"machine: {os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f} at start")
    results = []
    with tempfile.TemporaryDirectory() as d:
        for n in sizes:
            r = run(n, Path(d))
            results.append(r)
            print(f"N={r['n']:>6}: wall {r['wall']:7.1f} s  first run finished {r['first']:5.1f} s  "
                  f"slot-s per run {r['per_run']:.3f} (training {r['train']:.3f})  driver peak RSS "
                  f"{r['rss_runs']:5.0f} MB while running, {r['rss']:5.0f} MB with compact+reduce  "
                  f"load {os.getloadavg()[0]:.2f}", flush=True)
    base = next((r for r in results if r["n"] == 200), results[0])
    for r in results:
        if r is not base:
            print(f"growth per-run({r['n']})/per-run({base['n']}): {r['per_run'] / base['per_run']:.2f} (goal ≤ 1.2)")
    print("goals: slot-s per run ≤ 0.15 at ≥ 2,000; first run ≤ 30 s; driver RSS ≤ 1,500 MB at 10,000")


if __name__ == "__main__":
    main()
