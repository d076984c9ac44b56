"""What a fresh worker process pays before its first replica trains: the imports and the dataset
load of one digits replica, the tool's way against the way it was (scikit-learn's `load_digits` and
`train_test_split`, which import scipy.stats; `metrics` imported for per-class accuracy, which
imports it too), side by side in alternating fresh processes.

    python bench/bench_worker_start.py [rounds]   (default 5 rounds, ~1 minute on 2 cores)

Every Tune trial process and every data-parallel rank is such a process: a sweep starts at least one
per slot and pool, and tests start hundreds. Both sides also build the optimiser (torch.optim
imports torch._dynamo on its first use, a cost no side can avoid) and check that they loaded the
same arrays.
"""

import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

OURS = """
from orchestrator import runner, worker  # what a trial process imports
from workloads.data import load
d = load("digits")
"""
BEFORE = """
from orchestrator import metrics, runner, worker  # metrics imports scipy.stats
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from workloads.data import from_arrays
x, y = load_digits(return_X_y=True)
tx, vx, ty, vy = train_test_split(x.reshape(-1, 1, 8, 8), y, test_size=0.25, stratify=y, random_state=0)
d = from_arrays(tx, ty, vx, vy, num_classes=10)
"""
COMMON = """
import time
t0 = time.perf_counter()
{body}
import torch
torch.optim.SGD(torch.nn.Linear(64, 10).parameters(), lr=0.1)
print(time.perf_counter() - t0, float(d.test_x.sum()), int(d.train_y.sum()))
"""


def once(body: str) -> tuple[float, str]:
    out = subprocess.run([sys.executable, "-c", COMMON.format(body=body)], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout.split()
    return float(out[0]), " ".join(out[1:])


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    ours, before, same = [], [], True
    for _ in range(rounds):  # alternating, so that drifting load hits both sides alike
        (a, da), (b, db) = once(OURS), once(BEFORE)
        ours.append(a), before.append(b)
        same &= da == db
    mo, mb = statistics.median(ours), statistics.median(before)
    print(f"worker start to first replica's data, {rounds} fresh processes a side (median, min-max):")
    print(f"  ours   {mo:.2f} s ({min(ours):.2f}-{max(ours):.2f})")
    print(f"  before {mb:.2f} s ({min(before):.2f}-{max(before):.2f})")
    print(f"  ratio ours/before {mo / mb:.3f}, saved {mb - mo:.2f} s a process; same arrays: {same}")


if __name__ == "__main__":
    main()
