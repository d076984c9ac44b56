"""Per-run overhead of the orchestrator (Ray Tune trials) versus the same runs as bare Ray tasks.

    python bench/bench_scheduler.py [N]

Both sides run `runner.run` on N identical very short replicas (digits, MLP, 1 epoch) on one
shared local Ray cluster, so the difference is scheduling: Tune's trial actors, placement groups
and bookkeeping versus a plain remote function.
"""

import sys
import tempfile
import time
from pathlib import Path

import ray
import yaml

from orchestrator import runner, spec, store, sweep

N = int(sys.argv[1]) if len(sys.argv) > 1 else 20
DOC = {"name": "bench", "replicas": N, "noise": ["algo"],
       "workloads": [{"arch": "mlp", "dataset": "digits", "epochs": 1, "batch_size": 128}]}


def orchestrator_run(tmp: Path) -> float:
    (tmp / "s.yaml").write_text(yaml.safe_dump(DOC))
    t0 = time.perf_counter()
    assert sweep.main([str(tmp / "s.yaml"), "--out", str(tmp / "tune_out")]) == 0
    return time.perf_counter() - t0


def bare_ray_run(tmp: Path) -> float:
    runs = spec.expand(spec.parse(DOC))
    task = ray.remote(num_cpus=1)(runner.run)
    t0 = time.perf_counter()
    rows = ray.get([task.remote(r, str(tmp / "bare_out")) for r in runs])
    assert all(r["status"] == "ok" for r in rows)
    return time.perf_counter() - t0


def main() -> None:
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        bare = bare_ray_run(tmp)  # first, so its worker start-up is not hidden by warm caches
        tuned = orchestrator_run(tmp)
        work = store.read_runs(str(tmp / "tune_out"), columns=["train_seconds"])["train_seconds"].to_pylist()
    ray.shutdown()
    train = sum(work) / N
    print(f"runs: {N} (digits mlp, 1 epoch, 2 CPU workers); mean training time per run {train * 1e3:.0f} ms")
    print(f"bare Ray tasks : {bare:6.1f} s total, {bare / N * 1e3:6.0f} ms per run")
    print(f"orchestrator   : {tuned:6.1f} s total, {tuned / N * 1e3:6.0f} ms per run "
          "(includes resume check, reduce and summary)")
    print(f"ratio orchestrator / bare: {tuned / bare:.2f}")


if __name__ == "__main__":
    main()
