"""The spine end to end on a real local Ray cluster: noise presets behave as the study says,
tooling noise shows up, re-runs resume, and the Parquet matches the DESIGN.md contract."""

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestrator import reduce, store, sweep
from tests.conftest import write_spec

pytestmark = pytest.mark.integration


def by_noise(out):
    df = store.read_runs(str(out)).to_pandas()
    return {n: g.sort_values("replica") for n, g in df.groupby("noise")}


@pytest.fixture(scope="module")
def presets_out(every_preset):
    """The session's sweep of every preset, 3 replicas each (tests/conftest.py)."""
    return every_preset.spec, every_preset.out


def test_control_and_impl_replicas_are_bitwise_identical_on_cpu(presets_out):
    groups = by_noise(presets_out[1])
    for noise in ("control", "impl"):
        g = groups[noise]
        assert len(g) == 3 and (g.status == "ok").all()
        assert g.weights_sha256.nunique() == 1, noise
        assert len({tuple(p) for p in g.predictions}) == 1, noise


def test_algo_replicas_all_differ(presets_out):
    for noise in ("algo", "algo+impl"):
        g = by_noise(presets_out[1])[noise]
        assert g.weights_sha256.nunique() == 3, noise
        assert g.seed_init.nunique() == 3 and g.seed_order.nunique() == 3 and g.seed_augment.nunique() == 3


def test_rows_carry_seeds_flags_and_fingerprint(presets_out, every_preset):
    df = store.read_runs(str(presets_out[1])).to_pandas()
    control = df[df.noise == "control"]
    assert control.seed_init.nunique() == 1 and not control.vary_impl.any()
    assert df[df.noise == "impl"].vary_impl.all()
    assert set(df.ray_node_id) == every_preset.nodes
    assert (df.accelerator == "cpu").all() and (df.accelerator_requested == "any").all()
    assert (df.num_threads == 1).all() and df.fingerprint_id.str.len().eq(12).all()
    assert (df.torch_version != "").all() and df.cpu_model.notna().all()
    assert df.epoch_seconds.map(len).eq(2).all() and (df.train_seconds > 0).all()
    for _, r in df.iterrows():  # weights on disk are the weights the row describes
        assert os.path.getsize(store.weights_path(str(presets_out[1]), r.run_id)) > 0


def test_parquet_matches_the_design_contract(presets_out):
    contract = {
        "run_id": pa.string(), "sweep": pa.string(), "arch": pa.string(), "dataset": pa.string(),
        "noise": pa.string(), "vary_init": pa.bool_(), "vary_order": pa.bool_(), "vary_augment": pa.bool_(),
        "vary_impl": pa.bool_(), "replica": pa.int32(), "seed_init": pa.int64(), "seed_order": pa.int64(),
        "seed_augment": pa.int64(), "accelerator_requested": pa.string(), "accelerator": pa.string(),
        "fingerprint_id": pa.string(), "status": pa.string(), "error": pa.string(), "epochs": pa.int32(),
        "train_seconds": pa.float64(), "epoch_seconds": pa.list_(pa.float64()), "test_accuracy": pa.float64(),
        "test_loss": pa.float64(), "per_class_accuracy": pa.list_(pa.float64()),
        "predictions": pa.list_(pa.int32()), "weights_sha256": pa.string(), "weights_norm": pa.float64(),
        "num_threads": pa.int32(), "hostname": pa.string(), "ray_node_id": pa.string(),
    }
    files = sorted((presets_out[1] / "runs").glob("*.parquet"))
    assert len(files) == 24
    schema = pq.read_schema(files[0])
    for name, typ in contract.items():
        assert schema.field(name).type == typ, name
    t = pq.read_table(files[0])
    assert t.num_rows == 1 and len(t["predictions"][0]) == 450  # digits test split


def test_rerun_runs_nothing_and_keeps_one_row_per_run(presets_out, capsys):
    spec, out = presets_out
    before = {p.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*.parquet")}
    assert sweep.main([str(spec), "--out", str(out)]) == 0
    assert "0 to run" in capsys.readouterr().out
    after = {p.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*.parquet")}
    assert after == before
    ids = store.read_runs(str(out), columns=["run_id"])["run_id"].to_pylist()
    assert len(ids) == len(set(ids)) == 24


def test_thread_count_is_applied_in_the_worker_recorded_and_paired(ray_local, tmp_path, monkeypatch):
    """Tooling noise that no seed removes: same seeds, 1 versus 2 intra-op threads. Whether a given
    model's bits change with the thread count depends on the CPU, so that is measured (cross-stack
    table), never assumed here; the model used reduces in chunks that follow the thread count it
    sees inside the worker (tests/instrumented.py), so its weights differ exactly when the worker
    really applied different counts. (OUT is given relative to the caller's folder, as users do;
    workers run elsewhere and must write there.)"""
    spec = write_spec(tmp_path / "s.yaml", name="threads", replicas=1, tooling={"num_threads": [1, 2]},
                      workloads=[{"arch": "tests.instrumented:thread_witness", "dataset": "synthetic", "epochs": 1,
                                  "batch_size": 64, "lr": 0.01, "dataset_args": {"n_train": 256, "n_test": 64}}])
    monkeypatch.chdir(tmp_path)
    assert sweep.main([str(spec), "--out", "out"]) == 0
    df = store.read_runs(str(tmp_path / "out")).to_pandas().sort_values("num_threads")
    assert df.num_threads.tolist() == [1, 2]
    assert df.seed_init.nunique() == df.seed_order.nunique() == 1
    assert df.weights_sha256.nunique() == 2
    (pair,) = reduce.reduce(str(tmp_path / "out"), fmt=())["cross_stack"].itertuples()
    assert (pair.num_threads_a, pair.num_threads_b, pair.n_pairs) == (1, 2, 1)
    assert pair.identical_fraction == 0 and pair.l2 > 0
