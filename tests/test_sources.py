"""The sources table on generated results trees with known answers, the share intervals at the
replica counts users run, the verdicts, order-independence, the bit-flip preset, and an end-to-end
sweep of every single-source preset."""

import json
import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from orchestrator import metrics, noise, reduce, sources, store

TRUE_STD = {"init": 0.004, "order": 0.006, "augment": 0.005, "impl": 0.003, "algo+impl": 0.009}
FLIP = {"init": 0.05, "order": 0.08, "augment": 0.06, "impl": 0.03, "algo+impl": 0.1}  # per-example flip rate


def write_tree(root, stds: dict[str, float], flips: dict[str, float], n: int, seed: int = 0, n_test: int = 40,
               control: bool = True, arch: str = "mlp", mean: float = 0.9, compacted: bool = False) -> None:
    """A results tree as the runner writes it (rows only, no weights): per preset, n replicas whose
    accuracy is mean + N(0, std²) and whose predictions flip each example of one fixed model with
    the preset's rate (the labels file holds that model's predictions). `control` adds a preset
    whose replicas are all identical. `compacted`: the rows in one file, as `orchestrator.compact`
    leaves them (1,200 per-run files took 10 s to write and 4 s to read)."""
    rng = np.random.default_rng(seed)
    fs, r = store.resolve(str(root))
    base = rng.integers(0, 10, n_test)
    write_labels(root, base)
    presets = {**stds, **({"control": 0.0} if control else {})}
    rows = []
    for name, std in presets.items():
        for i in range(n):
            flip = rng.random(n_test) < flips.get(name, 0.0)
            preds = np.where(flip, (base + 1 + rng.integers(0, 9, n_test)) % 10, base)
            rows.append({
                "run_id": f"{arch}-{name}-{i}", "sweep": "t", "arch": arch, "dataset": "toy", "noise": name,
                "replica": i, "seed_init": i, "seed_order": i, "seed_augment": i, "accelerator_requested": "any",
                "accelerator": "cpu", "fingerprint_id": "fp0", "num_threads": 1, "precision": "fp32",
                "channels_last": False, "compiled": False, "status": "ok", "epochs": 1,
                "spec_json": json.dumps({"workload": {"arch": "mlp", "dataset": "toy"}}),
                "test_accuracy": mean + std * rng.standard_normal(), "predictions": preds.tolist(),
                # control's replicas are one model; every other run its own weights
                "weights_sha256": f"{arch}-control" if name == "control" else f"{arch}-{name}-{i}"})
    if compacted:
        store.write_table(fs, f"{r}/runs/{store.COMPACTED_PREFIX}{arch}.parquet", store.run_table(rows))
    else:
        for row in rows:
            store.write_run(fs, r, row)


def write_labels(root, labels: np.ndarray) -> None:
    fs, r = store.resolve(str(root))
    store.write_table(fs, store.labels_path(r, "toy"), pa.table(
        {"label": labels.astype("int32"), "subgroup": np.full(len(labels), -1, dtype="int32")},
        schema=store.LABELS_SCHEMA))


def independent_churn(preds: np.ndarray) -> float:
    """Churn by visiting every pair: the definition, not the vectorised trick."""
    pairs = [(preds[i] != preds[j]).mean() for i in range(len(preds)) for j in range(i + 1, len(preds))]
    return float(np.mean(pairs))


@pytest.fixture(scope="module")
def known(tmp_path_factory):
    """A 200-replica tree per preset with known stds, compacted, reduced once."""
    root = tmp_path_factory.mktemp("known")
    write_tree(root, TRUE_STD, FLIP, n=200, compacted=True)
    tables = reduce.reduce(str(root), fmt=("md", "csv", "parquet"))
    return root, tables


def test_known_tree_point_estimates_equal_an_independent_computation(known):
    root, tables = known
    rows = store.read_runs(str(root), columns=["noise", "replica", "test_accuracy", "predictions"]).to_pandas()
    table = tables["sources"].set_index("source")
    assert list(table.index) == ["init", "order", "augment", "impl", "control", "algo+impl"]
    ref = rows[rows["noise"] == "algo+impl"].sort_values("replica")
    ref_var = np.var(ref["test_accuracy"].to_numpy(), ddof=1)
    ref_churn = independent_churn(np.stack(ref["predictions"].to_numpy()))
    for name, row in table.iterrows():
        runs = rows[rows["noise"] == name].sort_values("replica")
        acc = runs["test_accuracy"].to_numpy()
        churn = independent_churn(np.stack(runs["predictions"].to_numpy()))
        assert row["reference"] == "algo+impl" and row["n_runs"] == 200 and row["paired"]
        assert row["acc_std"] == pytest.approx(np.std(acc, ddof=1), rel=1e-12, abs=1e-15)
        assert row["share"] == pytest.approx(np.var(acc, ddof=1) / ref_var, rel=1e-9, abs=1e-12)
        assert row["churn"] == pytest.approx(churn, rel=1e-12)
        assert row["churn_share"] == pytest.approx(churn / ref_churn, rel=1e-9, abs=0)
        assert row["share_lo"] <= row["share"] <= row["share_hi"]
        assert row["churn_share_lo"] <= row["churn_share"] <= row["churn_share_hi"]
    # the same std and interval as the variance table states for that preset
    variance = tables["variance"].set_index("noise")
    for c in ("acc_std", "acc_std_lo", "acc_std_hi", "churn"):
        assert table.loc["init", c] == variance.loc["init", c]
    # the true shares lie in the intervals (one tree: a sanity check; coverage is tested below)
    for name in ("init", "order", "augment", "impl"):
        true = (TRUE_STD[name] / TRUE_STD["algo+impl"]) ** 2
        assert table.loc[name, "share_lo"] < true < table.loc[name, "share_hi"]


def test_nothing_varies_reads_as_exact_zeros_not_nan(known):
    root, tables = known
    control = tables["sources"].set_index("source").loc["control"]
    for c in ("acc_std", "acc_std_lo", "acc_std_hi", "acc_std_dist", "acc_std_dist_lo", "acc_std_dist_hi",
              "churn", "share", "share_lo", "share_hi", "churn_share", "churn_share_lo", "churn_share_hi"):
        assert control[c] == 0.0, c
    md = (root / "tables" / "sources.md").read_text().splitlines()
    line = next(x for x in md if "| control" in x)
    assert "nan" not in line and "e-" not in line
    assert pd.read_parquet(root / "tables" / "sources.parquet").shape == tables["sources"].shape
    reference = tables["sources"].set_index("source").loc["algo+impl"]
    assert (reference["share"], reference["share_lo"], reference["share_hi"]) == (1.0, 1.0, 1.0)


INTERVALS = ["acc_std_lo", "acc_std_hi", "acc_std_dist_lo", "acc_std_dist_hi", "share_lo", "share_hi",
             "churn_share_lo", "churn_share_hi"]


@pytest.mark.parametrize("replicas", [3, 5])
def test_share_intervals_are_finite_at_three_and_five_replicas(tmp_path, replicas):
    """The percentile bootstrap was NaN in 81-100% of paired groups at 3-5 replicas (a resample that
    draws one replica R times has no variance and no pairs): every interval is now a number."""
    write_tree(tmp_path, TRUE_STD, FLIP, n=replicas, seed=replicas)
    table = reduce.reduce(str(tmp_path), fmt=("md",))["sources"]
    assert list(table["source"]) == ["init", "order", "augment", "impl", "control", "algo+impl"]
    assert np.isfinite(table[INTERVALS].to_numpy(float)).all()
    assert (table["share_lo"] <= table["share"]).all() and (table["share"] <= table["share_hi"]).all()
    assert table["paired"].all() and "nan" not in (tmp_path / "tables" / "sources.md").read_text()
    notes = table.set_index("source")["note"]
    assert "share: Pitman–Morgan interval, paired" in notes["init"] and "churn_share: jackknife" in notes["init"]


def test_a_wide_share_is_called_inconclusive_with_the_replicas_that_would_settle_it(tmp_path):
    """Five replicas of a source as noisy as the reference: its share's interval spans a factor of
    about 90 (hi/lo), so the row says `inconclusive` and how many replicas per preset would pin the
    share within x2 either way; at 60 replicas a source with 1/25 of the variance reads `below`."""
    write_tree(tmp_path / "small", {"init": 0.009, "algo+impl": 0.009}, {}, n=5, control=False)
    row = reduce.reduce(str(tmp_path / "small"), fmt=())["sources"].set_index("source").loc["init"]
    assert row["share_verdict"] == "inconclusive" and row["share_hi"] / row["share_lo"] > metrics.SHARE_FACTOR
    assert row["share_replicas"] > 5 and f"about {row['share_replicas']:.0f} per preset" in row["note"]
    write_tree(tmp_path / "large", {"init": 0.0018, "algo+impl": 0.009}, {}, n=60, control=False)
    table = reduce.reduce(str(tmp_path / "large"), fmt=())["sources"].set_index("source")
    assert table.loc["init", "share_verdict"] == "below reference" and table.loc["init", "share_hi"] < 1
    assert table.loc["algo+impl", "share_verdict"] == "reference" and table.loc["algo+impl", "share_replicas"] == 2


def false_verdict(t, level):
    """Whether a table of sources t[:-1] against the reference t[-1] reads some `below`/`above reference`."""
    return any(sources.share_verdict(False, *metrics.variance_share_ci(a, t[-1], False, level=level))
               in ("below reference", "above reference") for a in t[:-1])


def test_verdicts_hold_their_error_across_the_table():
    """400 tables of 5 sources, each exactly as noisy as the reference (true share 1), 5 independent
    replicas a preset: one 95% interval per row called some source `below`/`above reference` in
    9% of tables (20.6% with the F interval); at the family level (Bonferroni over the table's 5
    rows) at most 5%."""
    z = np.random.default_rng(4).standard_normal((400, 6, 5))  # table, preset (5 sources + reference), replica
    assert np.mean([false_verdict(t, sources.family_level(5)) for t in z]) <= 0.05
    assert np.mean([false_verdict(t, 0.95) for t in z]) > 0.05


def test_verdicts_hold_when_a_tenth_of_replicas_diverge():
    """The same tables with a tenth of replicas 6σ down, each preset on its own: with F intervals a
    false `below`/`above reference` in about 30% of tables at 5 replicas; with Bonett's at most 5%."""
    rng = np.random.default_rng(5)
    z = rng.standard_normal((400, 6, 5)) - 6.0 * (rng.random((400, 6, 5)) < 0.1)
    assert np.mean([false_verdict(t, sources.family_level(5)) for t in z]) <= 0.05


def test_the_verdict_is_read_from_the_family_level_interval(tmp_path):
    """Four sources with varying weights (control's are identical, so not in the family): each
    row's `_adj` interval is the share interval at 1 - 0.05/4, wider than the 95% one."""
    write_tree(tmp_path, TRUE_STD, FLIP, n=5)
    table = reduce.reduce(str(tmp_path), fmt=())["sources"].set_index("source")
    row = table.loc["init"]
    assert row["share_lo_adj"] < row["share_lo"] <= row["share"] <= row["share_hi"] < row["share_hi_adj"]
    assert sources.family_level(4) == pytest.approx(0.9875) and table.loc["control", "share"] == 0.0
    assert table.loc["control", "share_verdict"] == "none" and table.loc["control", "share_hi_adj"] == 0.0


@pytest.mark.parametrize("verdict, share, lo, hi", [("none", 0.0, 0.0, 0.0), ("below reference", 0.3, 0.01, 0.9),
                                                    ("above reference", 3.0, 1.2, 30.0),
                                                    ("like reference", 1.1, 0.6, 2.0),
                                                    ("inconclusive", 2.25, 0.47, 14.3),
                                                    ("no interval", 1.0, math.nan, math.nan)])
def test_share_verdict(verdict, share, lo, hi):
    assert sources.share_verdict(False, share, lo, hi, exact=verdict == "none") == verdict
    assert sources.share_verdict(True, share, lo, hi) == "reference"


def test_none_only_for_identical_weights_and_like_reference_only_inside_the_band():
    """Equal accuracies are not identical weights: a zero share with a non-zero upper end is
    `below reference`, never `none`; an interval holding 1 but reaching below 1/2 (a source with half
    the reference's variance could give it) is `inconclusive`, not `like reference`."""
    assert sources.share_verdict(False, 0.0, 0.0, 0.0) != "none"
    assert sources.share_verdict(False, 0.0, 0.0, 0.2) == "below reference"
    assert sources.share_verdict(False, 0.8, 0.4, 1.5) == "inconclusive"
    assert sources.share_verdict(False, 1.0, 0.6, 1.9) == "like reference"


def test_paired_share_interval_is_narrower_when_presets_share_seed_luck():
    """Replica r of a single-source preset shares its seed with replica r of the reference, so their
    accuracies correlate (0.71 here); the paired (Pitman–Morgan) interval uses that and is
    narrower than the F interval, which treats the presets as independent."""
    rng = np.random.default_rng(3)
    widths = {True: [], False: []}
    for _ in range(300):
        shared = rng.standard_normal(10)  # the seed's effect, common to both presets
        a = math.sqrt(0.5) * shared
        b = math.sqrt(0.5) * shared + math.sqrt(0.5) * rng.standard_normal(10)
        for paired in (True, False):
            _, lo, hi = metrics.variance_share_ci(a, b, paired=paired)
            widths[paired].append(hi / lo)
    assert np.median(widths[True]) < 0.8 * np.median(widths[False])


@pytest.mark.parametrize("paired", [True, False])
def test_churn_share_interval_covers_at_five_replicas(paired):
    """Replica k flips each of 100 examples of one model to another of 10 classes at its own rate
    q·exp(0.5 z_k) (z of paired replicas correlated 0.7); source q = 0.05, reference 0.1. Two
    replicas with rates p, p' disagree on an example with probability 1 - (1-p)(1-p') - pp'/9, so
    the true churn share is (2m - 10m²/9) / (2m' - 10m'²/9) with m, m' the mean rates. 500
    experiments of 5 replicas a preset."""
    rng = np.random.default_rng(5 + paired)
    n, r = 100, 5
    mean_rate = math.exp(0.125)  # E[exp(0.5 z)]

    def churn(m):
        return 2 * m - 10 * m * m / 9

    def replicas(rates, base):
        flip = rng.random((r, n)) < rates[:, None]
        return np.where(flip, (base + 1 + rng.integers(0, 9, (r, n))) % 10, base)
    true = churn(0.05 * mean_rate) / churn(0.1 * mean_rate)
    hits = 0
    for _ in range(500):
        z = rng.standard_normal((2, r))
        if paired:
            z[0] = 0.7 * z[1] + math.sqrt(1 - 0.49) * z[0]
        base = rng.integers(0, 10, n)
        _, lo, hi = metrics.churn_share_ci(replicas(0.05 * np.exp(0.5 * z[0]), base),
                                           replicas(0.1 * np.exp(0.5 * z[1]), base), paired=paired)
        hits += lo <= true <= hi
    assert 0.92 <= hits / 500 <= 0.985


def test_permuted_rows_give_identical_tables(tmp_path):
    """The same runs read in another order (compaction rewrites the order of rows) give the same
    tables bit for bit, also where --by pools settings and replica indices repeat."""
    write_tree(tmp_path / "a", TRUE_STD, FLIP, n=6)
    fs, root = store.resolve(str(tmp_path / "a"))
    for r in range(6):  # the same presets on 2 threads: with --by without num_threads, replicas repeat
        store.write_run(fs, root, {**store.read_runs(str(tmp_path / "a")).to_pandas().iloc[r].dropna().to_dict(),
                                   "run_id": f"t2-{r}", "num_threads": 2, "test_accuracy": 0.9 + 0.001 * r})
    rows = store.read_runs(str(tmp_path / "a"))
    shuffled = rows.take(np.random.default_rng(0).permutation(rows.num_rows))
    fs, b = store.resolve(str(tmp_path / "b"))
    store.write_table(fs, f"{b}/runs/{store.COMPACTED_PREFIX}0-0.parquet", shuffled)
    write_labels(tmp_path / "b", pq.read_table(tmp_path / "a" / "datasets" / "toy.parquet")["label"].to_numpy())
    for by in (None, ["arch", "dataset", "noise"]):
        first, second = (reduce.reduce(str(tmp_path / t), by=by, fmt=()) for t in ("a", "b"))
        for name in first:
            pd.testing.assert_frame_equal(first[name], second[name], check_exact=True, obj=f"{name} by={by}")


def test_distribution_wise_std_is_about_zero_for_independent_per_example_flips(tmp_path):
    """Replicas that differ from one fixed model only by independent per-example flips have no
    distribution-wise variance (Jordan 2023): the column beside each source is ≈ 0 and its
    interval reaches 0, while the accuracy std itself is not 0."""
    rng = np.random.default_rng(8)
    n_test, labels = 2000, rng.integers(0, 10, 2000)
    base = np.where(rng.random(n_test) < 0.9, labels, (labels + 1) % 10)
    fs, root = store.resolve(str(tmp_path))
    write_labels(tmp_path, labels)
    for name, q in (("init", 0.03), ("order", 0.05), ("algo+impl", 0.08)):
        for i in range(100):
            preds = np.where(rng.random(n_test) < q, (base + 1 + rng.integers(0, 9, n_test)) % 10, base)
            store.write_run(fs, root, {
                "run_id": f"{name}-{i}", "sweep": "t", "arch": "mlp", "dataset": "toy", "noise": name,
                "replica": i, "status": "ok", "accelerator_requested": "any", "fingerprint_id": "fp0",
                "spec_json": "{}", "test_accuracy": float((preds == labels).mean()), "predictions": preds.tolist()})
    table = reduce.reduce(str(tmp_path), fmt=("md",))["sources"].set_index("source")
    assert list(table.index) == ["init", "order", "algo+impl"]
    for _, row in table.iterrows():
        assert row["acc_std"] > 0.002
        assert row["acc_std_dist_lo"] == 0.0
        assert row["acc_std_dist"] ** 2 < 0.3 * row["acc_std"] ** 2


def test_groups_without_a_reference_give_no_rows_and_say_why(tmp_path):
    write_tree(tmp_path, {"init": 0.004}, {"init": 0.05}, n=5)
    table = reduce.reduce(str(tmp_path), fmt=("md",))["sources"]
    assert table.empty
    assert "algo+impl" in (tmp_path / "tables" / "sources.md").read_text()


# --- bitflip ----------------------------------------------------------------------------------

def test_bitflip_changes_one_weight_by_one_ulp_chosen_by_the_seed():
    from workloads import models

    def build():
        torch.manual_seed(0)
        return models.build("small_cnn", (1, 8, 8), 10)
    seeds = [noise.seeds_for(0, noise.PRESETS["bitflip"], r).bitflip for r in range(4)]
    assert len(set(seeds)) == 4 and noise.seeds_for(0, noise.PRESETS["algo+impl"], 0).bitflip is None
    where = set()
    for seed in seeds:
        ref, model = build(), build()
        where.add(noise.flip_lowest_bit(model, seed))
        assert noise.flip_lowest_bit(build(), seed) in where  # the same seed flips the same weight
        diffs = [(n, (a != b).nonzero()) for (n, a), (_, b) in zip(ref.named_parameters(), model.named_parameters())
                 if (a != b).any()]
        assert len(diffs) == 1 and len(diffs[0][1]) == 1
        name, idx = diffs[0][0], diffs[0][1][0]
        a, b = dict(ref.named_parameters())[name][tuple(idx)], dict(model.named_parameters())[name][tuple(idx)]
        assert abs(int(a.view(torch.int32)) - int(b.view(torch.int32))) == 1  # the lowest mantissa bit
    assert len(where) == 4  # each replica's seed picks its own weight
    # every other source is fixed: a bitflip replica's seeds are the control's
    control, flip = noise.seeds_for(0, frozenset(), 2), noise.seeds_for(0, noise.PRESETS["bitflip"], 2)
    assert (control.init, control.order, control.augment) == (flip.init, flip.order, flip.augment)


# --- end to end -------------------------------------------------------------------------------

@pytest.mark.integration
def test_sweep_of_every_source_gives_the_sources_table_and_figure(every_preset):
    """Digits, 3 replicas of each preset (the session's sweep, tests/conftest.py): on a CPU, impl
    replicas are bitwise identical, so its row is exact zeros; a one-bit change of one initial
    weight is recorded and spreads like any other source."""
    from orchestrator import report

    out = every_preset.out
    table = pd.read_parquet(out / "tables" / "sources.parquet").set_index("source")
    assert list(table.index) == ["init", "order", "augment", "impl", "bitflip", "control", "algo+impl"]
    assert (table["n_runs"] == 3).all() and table["paired"].all()
    assert np.isfinite(table[INTERVALS].to_numpy(float)).all()  # 3 replicas: every interval a number
    for name in ("impl", "control"):
        assert (table.loc[name, ["acc_std", "acc_std_lo", "acc_std_hi", "churn", "share", "share_lo",
                                 "share_hi", "churn_share"]] == 0.0).all(), name
    assert table.loc["algo+impl", "acc_std"] > 0 and table.loc["init", "churn"] > 0
    runs = store.read_runs(str(out), columns=["noise", "bitflip", "seed_bitflip", "weights_sha256"]).to_pandas()
    flips = runs[runs["noise"] == "bitflip"]
    assert flips["bitflip"].str.fullmatch(r"[\w.]+\[\d+\]").all() and flips["seed_bitflip"].nunique() == 3
    assert runs.loc[runs["noise"] != "bitflip", "bitflip"].isna().all()
    assert flips["weights_sha256"].nunique() == 3  # one ulp, three different final models
    line = next(x for x in (out / "tables" / "sources.md").read_text().splitlines() if "| impl " in x)
    assert "nan" not in line  # zeros read as zeros, not as missing
    page = open(report.write_report(str(out))).read()
    assert "Noise sources" in page and 'alt="share per source" src="data:image/png;base64,' in page


def test_identical_data_in_two_groups_gives_identical_intervals(tmp_path):
    """Two architectures whose runs carry the same numbers: their rows agree in every interval (a
    bootstrap seeded by the group's key gave each group slightly different ends)."""
    for arch in ("cnn", "mlp"):
        write_tree(tmp_path, TRUE_STD, FLIP, n=10, seed=7, arch=arch)
    table = reduce.reduce(str(tmp_path), fmt=())["sources"]
    cnn, mlp = (table[table["arch"] == a][["source", *INTERVALS]].reset_index(drop=True) for a in ("cnn", "mlp"))
    pd.testing.assert_frame_equal(cnn, mlp, check_exact=True)


def test_equal_accuracies_with_different_weights_are_not_none(tmp_path):
    """`impl` replicas with four different digests but one accuracy (a tie at the test set's
    resolution) are not exact: a non-zero upper end and a note, never `none`; `control` (one digest)
    keeps its exact zeros, as the digits demo's control and CPU impl do."""
    write_tree(tmp_path, {"impl": 0.0, "algo+impl": 0.01}, {}, n=4)
    tables = reduce.reduce(str(tmp_path), fmt=())
    src = tables["sources"].set_index("source")
    assert src.loc["control", "share_verdict"] == "none" and src.loc["control", "share_hi"] == 0.0
    impl = src.loc["impl"]
    assert impl["share"] == 0.0 and impl["share_hi"] > 0 and impl["share_verdict"] != "none"
    assert "weights differ" in impl["note"]
    var = tables["variance"].set_index("noise")
    assert (var.loc["control", "acc_std_lo"], var.loc["control", "acc_std_hi"]) == (0.0, 0.0)
    assert var.loc["impl", "acc_std"] == 0.0 and var.loc["impl", "acc_std_hi"] > 0
