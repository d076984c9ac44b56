"""What a declared stack costs per run, warm, against the launch environment; and a pip stack's
one-time build.

    python bench/bench_stacks.py [--runs N]   (default 16 per stack, ~3 minutes on 2 cores)

One sweep through the real command (`python -m orchestrator.sweep`, a fresh local Ray cluster of 2
CPUs) of N control runs of mlp on digits (1 epoch) in each of three stacks: the launch environment,
an env-var stack (ATEN_CPU_CAPABILITY=default) and a pip stack (six==1.16.0: a virtualenv that Ray
builds on the launch environment, per node, at the stack's first run there). A stack's runs reuse
their worker processes. Per-run wall: the time between consecutive runs finishing in the same
worker process (each row's file is written as its run ends), the first run of each process left out
(its process start, imports and dataset load are the cold start). Goal: warm stack / launch <= 1.1.
The stacks run one after another (one Tune run each), so a busy neighbour on a shared machine can
land on one of them: the load average is printed beside the figures.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=16, help="runs per stack")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        doc = {"name": "bench-stacks", "replicas": args.runs, "noise": ["control"], "stacks": STACKS,
               "workloads": [{"arch": "mlp", "dataset": "digits", "epochs": 1, "batch_size": 128}]}
        (Path(tmp) / "s.yaml").write_text(yaml.safe_dump(doc))
        out = Path(tmp) / "out"
        r = subprocess.run([sys.executable, "-m", "orchestrator.sweep", f"{tmp}/s.yaml", "--out", str(out)],
                           cwd=ROOT, capture_output=True, text=True, timeout=1800)
        assert r.returncode == 0, r.stderr[-3000:]
        walls = warm_walls(out)
    build = re.findall(r"stack pip: environment ready after (\d+) s", r.stdout + r.stderr)
    base = statistics.median(walls["launch"])
    print(f"{args.runs} runs per stack (digits mlp, 1 epoch, control, 2 CPU workers) on {fingerprint.cpu_model()}; "
          f"load average {os.getloadavg()[0]:.1f} at the end")
    print(f"{'stack':10} {'warm runs':>9} {'median s/run':>12} {'ratio to launch':>15}")
    for stack in ("launch", "env-var", "pip"):
        med = statistics.median(walls[stack])
        print(f"{stack:10} {len(walls[stack]):9d} {med:12.3f} {med / base:15.2f}")
    print(f"pip stack one-time build (first run on this node): {build[0] if build else '?'} s")


if __name__ == "__main__":
    main()
