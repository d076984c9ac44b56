"""Comparing two configurations: P(A > B), the t-tests and their power against Monte-Carlo
simulation, the equivalence test, and the compare command on generated results trees."""

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from orchestrator import compare, metrics, store
from tests.test_sources import write_tree

A, B = (0.905, 0.004), (0.900, 0.006)  # (mean, std) of two configurations' accuracies


def test_probability_of_improvement_agrees_with_monte_carlo():
    """The truth by Monte-Carlo (10^6 independent pairs); 300 simulated experiments of 50 runs a
    side: the estimates average within 2 points of it, and the 95% interval covers it 92-98%."""
    rng = np.random.default_rng(0)
    truth = float(np.mean(rng.normal(*A, 10 ** 6) > rng.normal(*B, 10 ** 6)))
    estimates, hits = [], []
    for _ in range(300):
        p, lo, hi = metrics.prob_improvement_ci(rng.normal(*A, 50), rng.normal(*B, 50))
        estimates.append(p)
        hits.append(lo <= truth <= hi)
    assert abs(np.mean(estimates) - truth) < 0.02
    assert 0.92 <= np.mean(hits) <= 0.98


def test_probability_of_improvement_counts_pairs_and_half_ties():
    a, b = np.array([1.0, 2.0, 3.0]), np.array([2.0, 0.0])
    brute = np.mean([(x > y) + 0.5 * (x == y) for x in a for y in b])
    assert metrics.prob_improvement(a, b) == pytest.approx(brute)
    assert metrics.prob_improvement_ci([0.9] * 4, [0.9] * 4) == (0.5, 0.5, 0.5)


def _mc_power(effect: float, stds: tuple, n: int, rng, sims: int = 40000) -> float:
    """Share of simulated experiments (n runs a side, or n pairs) in which scipy's test rejects at 0.05:
    the paired t-test on differences of std stds[0], or Welch's test of sides with stds (sa, sb)."""
    if len(stds) == 1:
        return float(np.mean(stats.ttest_1samp(rng.normal(effect, stds[0], (sims, n)), 0, axis=1).pvalue < 0.05))
    a, b = rng.normal(effect, stds[0], (sims, n)), rng.normal(0.0, stds[1], (sims, n))
    return float(np.mean(stats.ttest_ind(a, b, axis=1, equal_var=False).pvalue < 0.05))


CASES = [(0.012, (0.001, 0.002)),  # the old noncentral t gave NaN here and called 2 runs enough (power 0.63)
         (0.03, (0.004, 0.004)),   # the old formula said 0.94 at n=2 where the test has 0.63
         (0.005, (0.004, 0.006)), (0.01, (0.02, 0.005)), (0.004, (0.003,)), (0.01, (0.012,))]


@pytest.mark.parametrize("effect, stds", CASES)
def test_power_agrees_with_monte_carlo_at_2_to_10_runs(effect, stds):
    rng = np.random.default_rng(1)
    for n in range(2, 11):
        assert metrics.t_test_power(effect, stds, n) == pytest.approx(_mc_power(effect, stds, n, rng), abs=0.01), n


@pytest.mark.parametrize("effect, stds", CASES)
def test_replicas_needed_is_the_smallest_n_with_80_percent_power(effect, stds):
    rng = np.random.default_rng(2)
    n = int(metrics.replicas_needed(effect, stds))
    assert _mc_power(effect, stds, n, rng) >= 0.79  # n runs a side reach 80% power ...
    if n > 2:
        assert _mc_power(effect, stds, n - 1, rng) < 0.81  # ... and n - 1 do not (within simulation error)


def test_replicas_needed_edge_cases():
    assert metrics.replicas_needed(0.0, (0.004, 0.004)) == math.inf  # no difference: never detected
    assert metrics.replicas_needed(0.01, (0.0, 0.0)) == 2.0  # no spread: two runs a side suffice
    assert math.isnan(metrics.replicas_needed(math.nan, (0.004, 0.004)))
    assert math.isnan(metrics.replicas_needed(0.01, (math.nan,)))
    assert metrics.replicas_needed(1e-7, (0.004, 0.004), n_max=10 ** 5) == math.inf  # beyond n_max
    big = metrics.replicas_needed(0.0001, (0.004, 0.006))  # ~ 2·(z_α/2 + z_β)²·σ²/δ² for large n
    assert big == pytest.approx(2 * (1.95996 + 0.84162) ** 2 * (0.004 ** 2 + 0.006 ** 2) / 0.0001 ** 2 / 2, rel=0.01)


def test_replicas_needed_from_a_pilot_reaches_the_power_in_80_percent_of_pilots():
    """150 pilots of 5 pairs, true std of the differences 1, effect 1: the count from each pilot's
    std reaches 80% power (exactly, by t_test_power at the true std) in about half of them as a
    plug-in (46% in the issue's simulation); at the std's upper 80% limit in at least 80%."""
    rng = np.random.default_rng(5)
    pilots = np.sqrt(rng.chisquare(4, 150) / 4)
    reached = [metrics.t_test_power(1.0, (1.0,), int(metrics.replicas_needed(1.0, (s,), pilot=(5,)))) >= 0.8
               for s in pilots]
    assert np.mean(reached) >= 0.74
    assert metrics.assured_stds((1.0,), (5,)) == pytest.approx(math.sqrt(4 / stats.chi2.ppf(0.2, 4)))
    assert metrics.assured_stds((1.0, 2.0), (1, 5)).tolist() == [1.0, 2.0]  # a one-run pilot: taken as known


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("cmp")
    write_tree(root, {"order": 0.006, "algo+impl": 0.009}, {"order": 0.05, "algo+impl": 0.1}, n=30, n_test=2000)
    return root


def _sides(tree, a: str, b: str, drop_b: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    runs = pd.read_parquet(tree / "runs")
    xa = runs[runs["noise"] == a].sort_values("replica")["test_accuracy"].to_numpy()
    xb = runs[(runs["noise"] == b) & (runs["replica"] != drop_b)].sort_values("replica")["test_accuracy"].to_numpy()
    return xa, xb


@pytest.mark.filterwarnings("ignore:Precision loss:RuntimeWarning")  # scipy's own t-test on a zero-spread side
def test_compare_command_writes_the_numbers_an_independent_computation_gives(tree, capsys):
    assert compare.main([str(tree), "--a", "noise=algo+impl", "--b", "noise=control", "--effect", "0.01"]) == 0
    out = capsys.readouterr().out
    assert "paired t" in out and "80%" in out
    table = pd.read_parquet(tree / "tables" / "compare.parquet")
    assert len(table) == 1 and (tree / "tables" / "compare.md").exists() and (tree / "tables" / "compare.csv").exists()
    row = table.iloc[0]
    a, b = _sides(tree, "algo+impl", "control")
    assert (row["a"], row["b"], row["n_a"], row["n_b"], row["paired"]) == ("noise=algo+impl", "noise=control", 30, 30,
                                                                          True)
    assert row["diff"] == pytest.approx(a.mean() - b.mean(), abs=1e-15)
    assert row["diff_lo"] <= row["diff"] <= row["diff_hi"]
    assert row["p_a_gt_b"] == pytest.approx(np.mean([(x > y) + 0.5 * (x == y) for x in a for y in b]))
    assert row["welch_p"] == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue)
    assert row["std_b"] == 0.0 and row["std_diff"] == pytest.approx(np.std(a - b, ddof=1))
    assert row["replicas_needed"] == metrics.replicas_needed(a.mean() - b.mean(), (np.std(a - b, ddof=1),), pilot=(30,))
    assert row["replicas_needed_effect"] == metrics.replicas_needed(0.01, (np.std(a - b, ddof=1),), pilot=(30,))


def test_paired_sides_get_the_paired_t_test_and_its_power(tree, capsys):
    assert compare.main([str(tree), "--a", "noise=order", "--b", "noise=algo+impl"]) == 0
    row = pd.read_parquet(tree / "tables" / "compare.parquet").iloc[0]
    a, b = _sides(tree, "order", "algo+impl")
    ref = stats.ttest_rel(a, b)
    assert row["paired"] and row["test"] == "paired t" and "test: paired t on 30 pairs" in row["note"]
    assert (row["t"], row["p"]) == pytest.approx((ref.statistic, ref.pvalue))
    assert (row["diff_lo"], row["diff_hi"]) == pytest.approx(tuple(ref.confidence_interval()))
    assert row["welch_p"] == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue)  # kept, for comparison
    assert row["replicas_needed"] == metrics.replicas_needed(a.mean() - b.mean(), (np.std(a - b, ddof=1),), pilot=(30,))
    assert "replicas_needed assumes it" in row["note"]


def test_unpaired_sides_get_welch(tmp_path, capsys):
    """Side b lacks replica 3: the sides no longer pair, so every number is Welch's."""
    write_tree(tmp_path, {"order": 0.006, "algo+impl": 0.009}, {}, n=8, n_test=2000)
    (tmp_path / "runs" / "mlp-algo+impl-3.parquet").unlink()
    assert compare.main([str(tmp_path), "--a", "noise=order", "--b", "noise=algo+impl"]) == 0
    row = pd.read_parquet(tmp_path / "tables" / "compare.parquet").iloc[0]
    a, b = _sides(tmp_path, "order", "algo+impl", drop_b=3)
    ref = stats.ttest_ind(a, b, equal_var=False)
    assert not row["paired"] and row["test"] == "Welch t" and math.isnan(row["std_diff"])
    assert (row["t"], row["p"]) == pytest.approx((ref.statistic, ref.pvalue)) and row["p"] == row["welch_p"]
    assert (row["diff_lo"], row["diff_hi"]) == pytest.approx(tuple(ref.confidence_interval()))
    assert row["replicas_needed"] == metrics.replicas_needed(a.mean() - b.mean(), (np.std(a, ddof=1),
                                                                                   np.std(b, ddof=1)), pilot=(8, 7))


def test_margin_gives_an_equivalence_verdict(tmp_path, capsys):
    """Two stacks whose paired replicas differ by a tiny shift: equivalent within 0.005, not within
    0.00005; tost_p is the larger one-sided p of the paired t-test."""
    write_tree(tmp_path, {"algo": 0.004}, {}, n=12, control=False, n_test=4000)  # a resolution finer than 1e-4
    runs = store.read_runs(str(tmp_path)).to_pandas()
    fs, root = store.resolve(str(tmp_path))
    for _, r in runs.iterrows():  # the same runs again on 2 threads, 0.0001 better and a little noisy
        row = {k: v for k, v in r.items() if np.ndim(v) or pd.notna(v)}
        store.write_run(fs, root, {**row, "run_id": r["run_id"] + "-t2", "num_threads": 2,
                                   "test_accuracy": r["test_accuracy"] + 0.0001 + 0.0002 * (r["replica"] % 3 - 1)})
    for margin, equivalent in (("0.005", True), ("5e-05", False)):
        assert compare.main([str(tmp_path), "--a", "num_threads=2", "--b", "num_threads=1", "--margin", margin]) == 0
        out = capsys.readouterr().out
        row = pd.read_parquet(tmp_path / "tables" / "compare.parquet").iloc[0]
        assert row["paired"] and row["margin"] == float(margin) and row["equivalent"] == equivalent
        t = pd.read_parquet(tmp_path / "runs")
        a, b = (t[t["num_threads"] == k].sort_values("replica")["test_accuracy"].to_numpy() for k in (2, 1))
        m = float(margin)
        assert row["tost_p"] == pytest.approx(max(stats.ttest_1samp(a - b, -m, alternative="greater").pvalue,
                                                  stats.ttest_1samp(a - b, m, alternative="less").pvalue))
        words = "are equivalent within ±" if equivalent else "not shown equivalent within ±"
        assert f"{words}{margin}" in out and words in row["note"]
    with pytest.raises(SystemExit, match="2"):
        compare.main([str(tmp_path), "--a", "num_threads=2", "--b", "num_threads=1", "--margin", "-1"])
    assert "--margin: give a positive" in capsys.readouterr().err


def test_sides_accept_every_run_column(tree):
    """--a/--b take any scalar column of the run schema, which grows as axes are added (stack,
    world_size, attention): nothing is hard-coded."""
    scalars = [f.name for f in store.RUN_SCHEMA if not str(f.type).startswith("list")]
    for name in scalars:
        assert compare.parse_side("--a", f"{name}=x") == {name: "x"}


def test_compare_combines_keys_and_rejects_what_it_cannot_answer(tree, capsys):
    assert compare.main([str(tree), "--a", "noise=order,num_threads=1", "--b", "noise=algo+impl"]) == 0
    capsys.readouterr()
    for args, words in ((["--a", "colour=red", "--b", "noise=order"], ["--a", "colour", "not a run column"]),
                        (["--a", "noise=nope", "--b", "noise=order"], ["--a", "no ok run", "algo+impl"]),
                        (["--a", "noise", "--b", "noise=order"], ["--a", "KEY=VAL"]),
                        (["--a", "noise=order", "--b", "noise=order"], ["same runs"]),
                        (["--a", "noise=order", "--b", "num_threads=1"], ["overlap", "30 ok run(s) match both",
                                                                           "noise, num_threads"])):
        assert compare.main([str(tree), *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and all(w in err for w in words), err


def test_compare_writes_every_format_each_time(tree, capsys):
    """The report reads compare.parquet: a second comparison must replace all three files."""
    assert compare.main([str(tree), "--a", "noise=order", "--b", "noise=control"]) == 0
    assert compare.main([str(tree), "--a", "noise=algo+impl", "--b", "noise=order"]) == 0
    capsys.readouterr()
    tables = tree / "tables"
    assert pd.read_parquet(tables / "compare.parquet")["a"].tolist() == ["noise=algo+impl"]
    assert pd.read_csv(tables / "compare.csv")["a"].tolist() == ["noise=algo+impl"]
    assert "noise=algo+impl" in (tables / "compare.md").read_text()
    with pytest.raises(SystemExit):  # --format is gone: writing a subset let the report show an older table
        compare.main([str(tree), "--a", "noise=order", "--b", "noise=control", "--format", "md"])


def test_compare_never_pools_two_workloads_into_one_side(tmp_path, capsys):
    """Two architectures with very different accuracy: one row each, each with its own runs."""
    write_tree(tmp_path, {"order": 0.006, "algo+impl": 0.009}, {}, n=10, arch="small", mean=0.8)
    write_tree(tmp_path, {"order": 0.006, "algo+impl": 0.009}, {}, n=10, arch="large", mean=0.95, seed=1)
    assert compare.main([str(tmp_path), "--a", "noise=algo+impl", "--b", "noise=order"]) == 0
    table = pd.read_csv(tmp_path / "tables" / "compare.csv").set_index("arch")
    assert sorted(table.index) == ["large", "small"] and (table["n_a"] == 10).all()
    assert table.loc["small", "mean_a"] == pytest.approx(0.8, abs=0.01)
    assert table.loc["large", "mean_a"] == pytest.approx(0.95, abs=0.01)


def test_almost_stochastic_order_when_deepsig_is_installed():
    pytest.importorskip("deepsig")
    rng = np.random.default_rng(2)
    eps = compare.aso_eps(rng.normal(0.95, 0.004, 20), rng.normal(0.90, 0.004, 20), seed=0)
    assert 0.0 <= eps < 0.2  # A clearly dominates B


def _second_stack(root, shift: float, jitter: float, digest=None) -> None:
    """The tree's runs again on 2 threads, `shift` better with a little paired jitter; `digest`
    gives every copied run one weights digest per preset (a side that reproduces bit for bit)."""
    runs = store.read_runs(str(root)).to_pandas()
    fs, r = store.resolve(str(root))
    for _, run in runs.iterrows():
        row = {k: v for k, v in run.items() if np.ndim(v) or pd.notna(v)}
        store.write_run(fs, r, {**row, "run_id": run["run_id"] + "-t2", "num_threads": 2,
                                "weights_sha256": digest(run) if digest else run["weights_sha256"] + "-t2",
                                "test_accuracy": run["test_accuracy"] + shift + jitter * (run["replica"] % 3 - 1)})


def test_gate_exit_codes_and_exact_sides_in_words(tmp_path, capsys):
    """--require over all groups: 0 when it holds, 1 when the difference is outside the margin,
    3 when the replicas cannot decide (with the count that would), 2 without --margin. Two sides
    that each reproduce bit for bit (control) are exact: said in words, never as p = 0."""
    write_tree(tmp_path, {"algo": 0.004}, {}, n=3, n_test=4000)
    _second_stack(tmp_path, 0.0023, 0.0, digest=lambda run: f"t2-{run['noise']}" if run["noise"] == "control"
                  else run["weights_sha256"] + "-t2")
    exact = ["--a", "num_threads=2,noise=control", "--b", "num_threads=1,noise=control"]
    assert compare.main([str(tmp_path), *exact, "--margin", "0.005", "--require", "equivalent"]) == 0
    out = capsys.readouterr().out
    assert "exact: both sides reproduce bit for bit; difference 0.0023" in out and "p = 0" not in out
    row = pd.read_parquet(tmp_path / "tables" / "compare.parquet").iloc[0]
    assert row["exact"] and math.isnan(row["tost_p"]) and math.isnan(row["p"])
    assert compare.main([str(tmp_path), *exact, "--margin", "0.001", "--require", "equivalent"]) == 1
    assert compare.main([str(tmp_path), *exact, "--margin", "0.001", "--require", "no-worse"]) == 0  # A is better
    noisy = ["--a", "num_threads=2", "--b", "num_threads=1"]  # both groups, algo and control
    assert compare.main([str(tmp_path), *noisy, "--margin", "0.0024", "--require", "equivalent"]) == 3
    out = capsys.readouterr().out
    assert "cannot be decided" in out and "replicas per side would decide" in out
    assert compare.main([str(tmp_path), *noisy, "--margin", "0.001", "--require", "equivalent"]) == 1
    with pytest.raises(SystemExit, match="2"):
        compare.main([str(tmp_path), *noisy, "--require", "equivalent"])
    assert "--require: give --margin" in capsys.readouterr().err


def test_pairs_with_the_same_weights_on_both_sides_are_exact(tmp_path, capsys):
    """An upgrade that moved no bit: every replica's weights are the same on both sides while the
    replicas differ from each other (algo). A fact, said in words, not a TOST p-value."""
    write_tree(tmp_path, {"algo": 0.004}, {}, n=3, control=False, n_test=4000)
    _second_stack(tmp_path, 0.0, 0.0, digest=lambda run: run["weights_sha256"])
    assert compare.main([str(tmp_path), "--a", "num_threads=2", "--b", "num_threads=1", "--margin", "0.001",
                         "--require", "no-worse"]) == 0
    assert "exact: every pair has the same weights and accuracy on both sides (bit for bit); difference 0" in capsys.readouterr().out
    row = pd.read_parquet(tmp_path / "tables" / "compare.parquet").iloc[0]
    assert row["exact"] and row["same_weights"] and row["std_a"] > 0 and math.isnan(row["tost_p"])


def test_gate_holds_with_enough_replicas(tmp_path, capsys):
    """12 paired replicas a tiny shift apart, a side of independent digests per run: equivalent
    within 0.005 in the one group, exit 0; the tost_p is the paired t-test's."""
    write_tree(tmp_path, {"algo": 0.004}, {}, n=12, control=False, n_test=4000)
    _second_stack(tmp_path, 0.0001, 0.0002)
    assert compare.main([str(tmp_path), "--a", "num_threads=2", "--b", "num_threads=1", "--margin", "0.005",
                         "--require", "equivalent"]) == 0
    assert "holds in 1 of 1 groups" in capsys.readouterr().out
