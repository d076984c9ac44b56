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
