"""What the sweep prints: the short variance table tells its groups apart."""

import pandas as pd

from orchestrator import sweep
from orchestrator.reduce import DEFAULT_BY


def test_summary_shows_every_grouping_column_that_differs():
    """Two `small_cnn | control` rows that differ in workload and channels_last must not look alike."""
    variance = pd.DataFrame({
        "arch": ["small_cnn"] * 2, "dataset": ["digits"] * 2, "accelerator_requested": ["any"] * 2,
        "noise": ["control"] * 2, "num_threads": [1, 1], "precision": ["fp32"] * 2, "channels_last": [False, True],
        "compiled": [False, False], "workload": ["a1b2", "c3d4"], "n_runs": [5, 5], "acc_mean": [0.9, 0.91],
        "acc_std_sampling": [0.01, 0.01]})
    s = sweep.summary(variance)
    assert list(s.columns) == ["noise", "channels_last", "workload", "n_runs", "acc_mean"]
    assert not s.duplicated(subset=[c for c in s.columns if c in DEFAULT_BY]).any()
    one = sweep.summary(variance.iloc[:1])
    assert list(one.columns) == ["noise", "n_runs", "acc_mean"]


def test_a_worker_stopped_by_sigterm_prints_no_ignored_exception():
    """Ray's SIGTERM handler raises SystemExit; landing in a weakref callback as Ray stops a worker,
    Python printed "Exception ignored ... SystemExit: 1", forwarded to the sweep's terminal after
    the tables. The worker processes (every one imports orchestrator.worker) drop just that."""
    import subprocess
    import sys

    code = """
import gc, weakref
import orchestrator.worker
class A: pass
def stopped(_): raise SystemExit(1)  # as Ray's sigterm_handler does
def broken(_): raise ValueError("a real error")
a, b = A(), A()
refs = [weakref.ref(a, stopped), weakref.ref(b, broken)]
del a, b
gc.collect()
"""
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stderr
    assert "SystemExit" not in err and "ValueError: a real error" in err


def test_more_threads_than_cpus_is_said_at_start(tmp_path):
    """num_threads 2 with resources.cpus 1 ran 3.5x slower with no word about it (issue #18)."""
    from orchestrator import spec

    doc = {"name": "t", "tooling": {"num_threads": [1, 2]}, "workloads": [{"arch": "mlp", "dataset": "digits"}]}
    (note,) = sweep.resource_notes(spec.parse(doc))
    assert note.startswith("tooling.num_threads 2 > resources.cpus 1: those runs ask Ray for 2 CPUs each")
    assert sweep.resource_notes(spec.parse(doc | {"resources": {"cpus": 2}})) == []
