"""What a declared stack costs per run, warm, against the launch environment; and a pip stack's
one-time build.

    python bench/bench_stacks.py [--runs N] [--rounds R]   (default 30 runs, 2 rounds: ~5 minutes on 2 cores)

Each round is one sweep through the real command (`python -m orchestrator.sweep`, a fresh local Ray
cluster of 2 CPUs) of N control runs of mlp on digits (1 epoch) in each of three stacks: the launch environment,
an env-var stack (ATEN_CPU_CAPABILITY=default) and a pip stack (six==1.16.0: a virtualenv that Ray
builds on the launch environment, per node, at the stack's first run there). A stack's runs reuse
their worker processes. Per-run wall: the time between consecutive runs finishing in the same
worker process (each row's file is written as its run ends), the first run of each process left out
(its process start, imports and dataset load are the cold start). Goal: warm stack / launch <= 1.1.
The stacks run one after another (one Tune run each), so a busy neighbour on a shared machine can
land on one of them: rounds alternate the stacks' order (and each builds the pip stack afresh, on a
new cluster), and the load average is printed beside the figures.
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from orchestrator import fingerprint, store  # noqa: E402

STACKS = [{"name": "launch"}, {"name": "env-var", "env_vars": {"ATEN_CPU_CAPABILITY": "default"}},
          {"name": "pip", "pip": ["six==1.16.0"]}]


def warm_walls(out: Path) -> dict[str, list[float]]:
    """Per stack: seconds between consecutive run completions of each worker process, the first left out."""
    df = store.read_runs(str(out), columns=["run_id", "stack", "worker_pid", "status"]).to_pandas()
    assert (df.status == "ok").all(), df[df.status != "ok"]
    df["done"] = [os.stat(store.run_path(str(out), r)).st_mtime for r in df.run_id]
    walls = {}
    for stack, g in df.groupby("stack"):
        walls[stack] = [d for _, p in g.groupby("worker_pid") for d in p["done"].sort_values().diff().dropna()]
    return walls


def sweep_round(stacks: list[dict], runs: int) -> tuple[dict[str, list[float]], str | None]:
    """One sweep over `stacks` in that order: warm per-run walls per stack, and the pip build's seconds."""
    with tempfile.TemporaryDirectory() as tmp:
        doc = {"name": "bench-stacks", "replicas": runs, "noise": ["control"], "stacks": stacks,
               "workloads": [{"arch": "mlp", "dataset": "digits", "epochs": 1, "batch_size": 128}]}
        (Path(tmp) / "s.yaml").write_text(yaml.safe_dump(doc))
        out = Path(tmp) / "out"
        r = subprocess.run([sys.executable, "-m", "orchestrator.sweep", f"{tmp}/s.yaml", "--out", str(out)],
                           cwd=ROOT, capture_output=True, text=True, timeout=1800)
        assert r.returncode == 0, r.stderr[-3000:]
        build = re.findall(r"stack pip: environment ready after (\d+) s", r.stdout + r.stderr)
        return warm_walls(out), (build[0] if build else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=30, help="runs per stack and round")
    parser.add_argument("--rounds", type=int, default=2, help="sweeps, the stacks' order reversed every other one")
    args = parser.parse_args()
    walls, builds = {s["name"]: [] for s in STACKS}, []
    print(f"{args.runs} runs per stack and round (digits mlp, 1 epoch, control, 2 CPU workers) "
          f"on {fingerprint.cpu_model()}")
    for n in range(args.rounds):
        order = STACKS if n % 2 == 0 else STACKS[::-1]
        got, build = sweep_round(order, args.runs)
        base = statistics.median(got["launch"])
        print(f"round {n + 1} ({' -> '.join(s['name'] for s in order)}): "
              + ", ".join(f"{k} {statistics.median(v) / base:.2f}" for k, v in got.items())
              + f" of launch; pip build {build} s; load average {os.getloadavg()[0]:.1f}")
        for k, v in got.items():
            walls[k] += v
        builds.append(build)
    base = statistics.median(walls["launch"])
    print(f"{'stack':10} {'warm runs':>9} {'median s/run':>12} {'ratio to launch':>15}")
    for stack, v in walls.items():
        print(f"{stack:10} {len(v):9d} {statistics.median(v):12.3f} {statistics.median(v) / base:15.2f}")
    print(f"pip stack one-time build (first run on a new node), per round: {', '.join(map(str, builds))} s")


if __name__ == "__main__":
    main()
