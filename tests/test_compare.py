"""Comparing two configurations: P(A > B) and the power calculation against Monte-Carlo
simulation, and the compare command on a generated results tree."""

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from orchestrator import compare, metrics
from tests.test_sources import write_tree

A, B = (0.905, 0.004), (0.900, 0.006)  # (mean, std) of two configurations' accuracies


def test_probability_of_improvement_agrees_with_monte_carlo():
    """The truth by Monte-Carlo (10^6 independent pairs); 300 simulated experiments of 50 runs a
    side: the estimates average within 2 points of it, and the 95% interval covers it 92-98%."""
    rng = np.random.default_rng(0)
    truth = float(np.mean(rng.normal(*A, 10 ** 6) > rng.normal(*B, 10 ** 6)))
    estimates, hits = [], []
    for k in range(300):
        p, lo, hi = metrics.prob_improvement_ci(rng.normal(*A, 50), rng.normal(*B, 50), seed=k, n_boot=1000)
        estimates.append(p)
        hits.append(lo <= truth <= hi)
    assert abs(np.mean(estimates) - truth) < 0.02
    assert 0.92 <= np.mean(hits) <= 0.98


def test_probability_of_improvement_counts_pairs_and_half_ties():
    a, b = np.array([1.0, 2.0, 3.0]), np.array([2.0, 0.0])
    brute = np.mean([(x > y) + 0.5 * (x == y) for x in a for y in b])
    assert metrics.prob_improvement(a, b) == pytest.approx(brute)
    assert metrics.prob_improvement_ci([0.9] * 4, [0.9] * 4, seed=0) == (0.5, 0.5, 0.5)


def _mc_power(effect: float, sa: float, sb: float, n: int, rng, sims: int = 20000) -> float:
    """Share of simulated experiments (n runs a side) in which scipy's Welch test rejects at 0.05."""
    a = rng.normal(effect, sa, (sims, n))
    b = rng.normal(0.0, sb, (sims, n))
    return float(np.mean(stats.ttest_ind(a, b, axis=1, equal_var=False).pvalue < 0.05))


@pytest.mark.parametrize("effect, sa, sb", [(0.005, 0.004, 0.006), (0.002, 0.003, 0.003), (0.01, 0.02, 0.005)])
def test_power_and_replicas_needed_agree_with_monte_carlo(effect, sa, sb):
    rng = np.random.default_rng(1)
    n = int(metrics.replicas_needed(effect, sa, sb))
    for m in (max(2, n // 2), n):
        assert abs(metrics.welch_power(effect, sa, sb, m) - _mc_power(effect, sa, sb, m, rng)) < 0.02
    assert _mc_power(effect, sa, sb, n, rng) >= 0.78  # n runs a side reach 80% power ...
    assert _mc_power(effect, sa, sb, n - 1, rng) < 0.82  # ... and n - 1 do not (within simulation error)


def test_replicas_needed_edge_cases():
    assert metrics.replicas_needed(0.0, 0.004, 0.004) == float("inf")  # no difference: never detected
    assert metrics.replicas_needed(0.01, 0.0, 0.0) == 2.0  # no spread: two runs a side suffice
    assert np.isnan(metrics.replicas_needed(float("nan"), 0.004, 0.004))


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("cmp")
    write_tree(root, {"order": 0.006, "algo+impl": 0.009}, {"order": 0.05, "algo+impl": 0.1}, n=30)
    return root


@pytest.mark.filterwarnings("ignore:Precision loss:RuntimeWarning")  # scipy's own t-test on a zero-spread side
def test_compare_command_writes_the_numbers_an_independent_computation_gives(tree, capsys):
    assert compare.main([str(tree), "--a", "noise=algo+impl", "--b", "noise=control", "--effect", "0.01"]) == 0
    out = capsys.readouterr().out
    assert "Welch" in out and "80%" in out
    table = pd.read_parquet(tree / "tables" / "compare.parquet")
    assert len(table) == 1 and (tree / "tables" / "compare.md").exists() and (tree / "tables" / "compare.csv").exists()
    row = table.iloc[0]
    runs = pd.read_parquet(tree / "runs")
    a = runs[runs["noise"] == "algo+impl"].sort_values("replica")["test_accuracy"].to_numpy()
    b = runs[runs["noise"] == "control"].sort_values("replica")["test_accuracy"].to_numpy()
    assert (row["a"], row["b"], row["n_a"], row["n_b"], row["paired"]) == ("noise=algo+impl", "noise=control", 30, 30,
                                                                          True)
    assert row["diff"] == pytest.approx(a.mean() - b.mean(), abs=1e-15)
    assert row["diff_lo"] <= row["diff"] <= row["diff_hi"]
    assert row["p_a_gt_b"] == pytest.approx(np.mean([(x > y) + 0.5 * (x == y) for x in a for y in b]))
    assert row["welch_p"] == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue)
    assert row["std_b"] == 0.0
    assert row["replicas_needed"] == metrics.replicas_needed(a.mean() - b.mean(), np.std(a, ddof=1), 0.0)
    assert row["replicas_needed_effect"] == metrics.replicas_needed(0.01, np.std(a, ddof=1), 0.0)


def test_compare_combines_keys_and_rejects_what_it_cannot_answer(tree, capsys):
    assert compare.main([str(tree), "--a", "noise=order,num_threads=1", "--b", "noise=algo+impl",
                         "--format", "md"]) == 0
    capsys.readouterr()
    for args, words in ((["--a", "colour=red", "--b", "noise=order"], ["--a", "colour", "not a run column"]),
                        (["--a", "noise=nope", "--b", "noise=order"], ["--a", "no ok run", "algo+impl"]),
                        (["--a", "noise", "--b", "noise=order"], ["--a", "KEY=VAL"]),
                        (["--a", "noise=order", "--b", "noise=order"], ["same runs"])):
        assert compare.main([str(tree), *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and all(w in err for w in words), err


def test_compare_never_pools_two_workloads_into_one_side(tmp_path, capsys):
    """Two architectures with very different accuracy: one row each, each with its own runs."""
    write_tree(tmp_path, {"order": 0.006, "algo+impl": 0.009}, {}, n=10, arch="small", mean=0.8)
    write_tree(tmp_path, {"order": 0.006, "algo+impl": 0.009}, {}, n=10, arch="large", mean=0.95, seed=1)
    assert compare.main([str(tmp_path), "--a", "noise=algo+impl", "--b", "noise=order", "--format", "csv"]) == 0
    table = pd.read_csv(tmp_path / "tables" / "compare.csv").set_index("arch")
    assert sorted(table.index) == ["large", "small"] and (table["n_a"] == 10).all()
    assert table.loc["small", "mean_a"] == pytest.approx(0.8, abs=0.01)
    assert table.loc["large", "mean_a"] == pytest.approx(0.95, abs=0.01)


def test_almost_stochastic_order_when_deepsig_is_installed():
    pytest.importorskip("deepsig")
    rng = np.random.default_rng(2)
    eps = compare.aso_eps(rng.normal(0.95, 0.004, 20), rng.normal(0.90, 0.004, 20), seed=0)
    assert 0.0 <= eps < 0.2  # A clearly dominates B
