"""Entrypoint workloads: the user's own training function under the harness. Unit tests of the
context and the return contract, then the shipped example on a real local Ray cluster."""

import dataclasses
import json
import math
import random

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from safetensors.torch import load_file

from orchestrator import entrypoint, runner, store, sweep
from orchestrator.noise import seeds_for
from orchestrator.reduce import reduce
from orchestrator.spec import SpecError, expand, expand_probes, parse
from tests.conftest import ROOT
from workloads.train import Diverged

EXAMPLE = {"entrypoint": "examples.own_training:train", "name": "digits_cnn", "dataset": "sklearn_digits"}


def ctx(vary=frozenset(), replica=0):
    return entrypoint.Context(device=torch.device("cpu"), seeds=seeds_for(0, vary, replica), deterministic=True,
                              num_threads=1, precision="fp32", channels_last=False, compile=False, run_id="r")


# --- spec ------------------------------------------------------------------------------------------

def test_spec_takes_entrypoint_and_builtin_workloads_side_by_side():
    spec = parse({"name": "t", "replicas": 1, "noise": ["control"], "overhead": {},
                  "workloads": [EXAMPLE | {"args": {"epochs": 1}}, {"arch": "small_cnn", "dataset": "digits"}]})
    runs = expand(spec)
    assert [r.workload.arch for r in runs] == ["digits_cnn", "small_cnn"]
    assert runs[0].run_id.startswith("digits_cnn-sklearn_digits-control-r0-")
    assert type(runs[0].model_validate(runs[0].model_dump(mode="json")).workload) is type(runs[0].workload)
    assert [p.workload.arch for p in expand_probes(spec)] == ["small_cnn"]  # user code gets no probe


@pytest.mark.parametrize("workload, message", [
    (EXAMPLE | {"entrypoint": "examples.nowhere:train"},
     "spec: workloads.0.entrypoint: cannot import 'examples.nowhere:train' (ModuleNotFoundError"),
    (EXAMPLE | {"entrypoint": "examples.own_training:nope"},
     "spec: workloads.0.entrypoint: cannot import 'examples.own_training:nope' (AttributeError"),
    (EXAMPLE | {"entrypoint": "examples/own_training.py"}, "spec: workloads.0.entrypoint: String should match"),
    (EXAMPLE | {"epochs": 3}, "spec: workloads.0.epochs: unknown key; remove it or fix its spelling"),
    ({"arch": "small_cnn", "dataset": "digits", "lr": -1}, "spec: workloads.0.lr: Input should be greater than 0"),
    (EXAMPLE | {"args": {"epochz": 1}}, "spec: workloads.0.args: 'epochz' is not an argument of "
     "examples.own_training:train; did you mean 'epochs'? fix or remove the key"),
    (EXAMPLE | {"args": {"colour": 1}}, "spec: workloads.0.args: 'colour' is not an argument of "
     "examples.own_training:train; it takes epochs, batch_size, lr, num_workers; fix or remove the key"),
    ({"entrypoint": "tests.user_functions:needs_size", "name": "n", "dataset": "n"},
     "spec: workloads.0.args: tests.user_functions:needs_size requires 'size', which has no default; add it"),
])
def test_bad_workloads_give_one_line_naming_the_field(workload, message):
    with pytest.raises(SpecError) as e:
        parse({"name": "t", "workloads": [workload]})
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


# --- context ---------------------------------------------------------------------------------------

def test_seeds_vary_only_for_varying_sources():
    a, b = ctx(frozenset({"order"}), 0), ctx(frozenset({"order"}), 1)
    assert a.seed("init") == b.seed("init") and a.seed("augment") == b.seed("augment")
    assert a.seed("order") != b.seed("order") and len({a.seed(s) for s in ("init", "order", "augment")}) == 3
    assert torch.equal(torch.randperm(50, generator=a.generator("order")),
                       torch.randperm(50, generator=ctx(frozenset({"order"}), 0).generator("order")))
    with pytest.raises(ValueError, match="unknown source 'impl'"):
        a.seed("impl")


def test_worker_init_fn_seeds_per_worker_and_epoch_from_augment():
    def draws(c, worker):
        c.worker_init_fn(worker)
        return torch.rand(3).tolist(), np.random.rand(), random.random()

    c = ctx()
    first = draws(c, 0)
    assert draws(ctx(), 0) == first and draws(c, 1) != first
    c.report(epoch=1)
    assert draws(c, 0) != first  # a new epoch, new worker draws
    assert draws(ctx(frozenset({"augment"}), 1), 0) != first


def test_per_rank_splits_the_global_batch_or_says_it_cannot():
    two = dataclasses.replace(ctx(), rank=1, world_size=2)
    assert ctx().per_rank(64) == 64 and two.per_rank(64) == 32
    with pytest.raises(ValueError, match="batch size 63 does not split evenly over 2 ranks"):
        two.per_rank(63)


def test_report_times_epochs_and_stops_a_diverged_run():
    c = ctx()
    c.report(epoch=1, train_loss=torch.tensor(0.5))
    assert c.reports[0]["epoch"] == 1 and c.reports[0]["train_loss"] == 0.5 and c.reports[0]["seconds"] >= 0
    with pytest.raises(Diverged, match="diverged at epoch 2: train_loss=nan"):
        c.report(epoch=2, train_loss=float("nan"))


# --- the return contract ---------------------------------------------------------------------------

@pytest.mark.parametrize("result, message", [
    ([1, 2], "returned list"),
    ({"labels": [0, 1]}, "no 'predictions'"),
    ({"predictions": [0, 1]}, "no 'labels'"),
    ({"predictions": [0, 1, 1], "labels": [0, 1]}, "3 predictions for 2 labels"),
    ({"predictions": [0.0, 1.0], "labels": [0, 1]}, "'predictions' is float64 of shape (2,)"),
    ({"predictions": torch.zeros(2, 3, dtype=torch.int64), "labels": [0, 1]}, "shape (2, 3)"),
    ({"predictions": [0, -1], "labels": [0, 1]}, "class indices >= 0"),
    ({"predictions": [0, 1], "labels": [0, 1], "state_dict": {"w": [1.0]}}, "'state_dict' must map names to tensors"),
    ({"predictions": [0, 1], "labels": [0, 1], "test_loss": "low"}, "'test_loss' is str"),
])
def test_returns_that_break_the_contract_are_named(result, message):
    with pytest.raises(entrypoint.ContractError) as e:
        entrypoint.check(result, [])
    assert message in str(e.value) and "must return {predictions, labels" in str(e.value)


def test_accuracy_comes_from_predictions_and_labels():
    result, labels = entrypoint.check({"predictions": torch.tensor([0, 1, 1, 2]), "labels": np.array([0, 1, 2, 2]),
                                       "state_dict": {"w": torch.ones(2)}}, [1.0])
    assert result.test_accuracy == 0.75 and result.per_class_accuracy == [1.0, 1.0, 0.5]
    assert math.isnan(result.test_loss) and labels.tolist() == [0, 1, 2, 2] and result.state_dict["w"].sum() == 2
    assert entrypoint.class_accuracy(np.array([0, 0]), np.array([2, 2])) == (0.0, [0.0, 0.0, 0.0])


def test_labels_must_match_the_dataset_s_earlier_runs(tmp_path):
    fs, root = store.resolve(str(tmp_path))
    runner._check_labels(fs, root, "d", np.array([0, 1, 2]))
    runner._check_labels(fs, root, "d", np.array([0, 1, 2]))
    with pytest.raises(entrypoint.ContractError, match="labels differ from those of dataset 'd'"):
        runner._check_labels(fs, root, "d", np.array([2, 1, 0]))


@pytest.mark.parametrize("noise, deterministic", [("control", 1), ("impl", 0)])
def test_noise_settings_are_applied_before_the_function_runs(tmp_path, torch_switches, noise, deterministic):
    spec = parse({"name": "t", "replicas": 1, "noise": [noise], "tooling": {"num_threads": [2]},
                  "workloads": [{"entrypoint": "tests.user_functions:settings_seen", "name": "s", "dataset": "s"}]})
    row = runner.run(expand(spec)[0], str(tmp_path))
    assert row["status"] == "ok" and row["predictions"] == [2, deterministic, deterministic, 1]
    assert row["epochs"] == 0 and "weights_sha256" not in row and not (tmp_path / "weights").exists()
    assert row["test_accuracy"] == np.mean(np.array(row["predictions"]) == 0) and row["fingerprint_id"] and row["seed_init"] == expand(spec)[0].seeds.init


def test_a_failed_run_keeps_its_traceback_in_the_row_and_a_log_and_its_last_frame_in_the_error(tmp_path):
    spec = parse({"name": "t", "replicas": 1, "noise": ["control"],
                  "workloads": [{"entrypoint": "tests.user_functions:raises", "name": "r", "dataset": "r"}]})
    run = expand(spec)[0]
    row = runner.run(run, str(tmp_path))
    where = f"{ROOT / 'tests/user_functions.py'}:8 in raises"
    assert row["status"] == "failed" and row["error"].endswith(f"look elsewhere (at {where})")
    assert "\n" not in row["error"]
    stored = store.read_runs(str(tmp_path)).to_pylist()[0]
    log = (tmp_path / "logs" / f"{run.run_id}.log").read_text()
    assert stored["traceback"] == log == row["traceback"]
    # the user's frame and the wrapper's, chained: the whole story, not one line
    assert 'user_functions.py", line 8, in raises' in log and "EntrypointError" in log and "ValueError" in log
    assert ok_traceback_is_null(tmp_path)


def test_what_the_users_function_prints_is_prefixed_by_its_run(tmp_path, capsys):
    """Ray prefixes a worker's lines with its process only, and one process runs many replicas:
    each line the function prints starts with its run id (stdout and stderr, pieces joined)."""
    spec = parse({"name": "t", "replicas": 1, "noise": ["control"],
                  "workloads": [{"entrypoint": "tests.user_functions:talks", "name": "p", "dataset": "p"}]})
    run = expand(spec)[0]
    assert runner.run(run, str(tmp_path))["status"] == "ok"
    out, err = capsys.readouterr()
    assert f"[{run.run_id}] epoch 1 done\n[{run.run_id}] loss 0.5\n" in out
    assert f"[{run.run_id}] warning: slow\n" in err
    print("after the run")  # the streams are the test's own again
    assert capsys.readouterr().out == "after the run\n"


def ok_traceback_is_null(tmp_path) -> bool:
    spec = parse({"name": "t", "replicas": 1, "noise": ["control"],
                  "workloads": [{"entrypoint": "tests.user_functions:settings_seen", "name": "s", "dataset": "s"}]})
    row = runner.run(expand(spec)[0], str(tmp_path / "ok"))
    return row["status"] == "ok" and store.read_runs(str(tmp_path / "ok")).to_pylist()[0]["traceback"] is None


def test_a_source_that_changed_seeds_but_not_the_weights_is_noted_in_the_variance_table(tmp_path):
    spec = parse({"name": "t", "replicas": 2, "noise": ["order", "init"],
                  "workloads": [{"entrypoint": "tests.user_functions:ignores_order", "name": "io", "dataset": "io"}]})
    for run in expand(spec):
        assert runner.run(run, str(tmp_path))["status"] == "ok"
    v = reduce(str(tmp_path))["variance"].set_index("noise")
    assert v.loc["order", "identical_fraction"] == 1 and v.loc["order", "note"].startswith(
        "no effect: order seeds changed but the weights are identical")
    assert v.loc["init", "identical_fraction"] == 0 and "no effect" not in v.loc["init", "note"]
    # and the sweep's end lines say it under the summary, labelled by its group
    assert sweep.no_effect(v.reset_index()) == [
        "order: no effect: order seeds changed but the weights are identical (check that the training draws "
        "from them: ctx.seed / ctx.generator in your own code)"]


# --- the example on a real local Ray cluster ---------------------------------------------------------

@pytest.fixture(scope="module")
def own_out(ray_local, tmp_path_factory):
    """The shipped sweep, 2 replicas of 2 epochs, plus three user functions that break the contract."""
    tmp = tmp_path_factory.mktemp("own")
    doc = yaml.safe_load((ROOT / "sweeps/own_training.yaml").read_text())
    doc["replicas"] = 2
    for w in doc["workloads"]:
        w["args"]["epochs"] = 2
    doc["workloads"] += [{"entrypoint": f"tests.user_functions:{fn}", "name": fn, "dataset": "broken", "replicas": 1}
                         for fn in ("raises", "wrong_length", "no_labels")]
    (tmp / "s.yaml").write_text(yaml.safe_dump(doc))
    out = tmp / "out"
    assert sweep.main([str(tmp / "s.yaml"), "--out", str(out)]) == 1  # the broken ones failed, recorded
    return store.read_runs(str(out)).to_pandas(), out


@pytest.mark.integration
def test_example_control_identical_with_and_without_workers_and_algo_all_differ(own_out):
    df = own_out[0]
    ok = df[df.arch == "digits_cnn"]
    assert len(ok) == 8 and (ok.status == "ok").all()
    ok = ok.assign(workers=[json.loads(s)["workload"]["args"]["num_workers"] for s in ok.spec_json])
    for (noise, workers), g in ok.groupby(["noise", "workers"]):
        assert len(g) == 2
        if noise == "control":
            assert g.weights_sha256.nunique() == 1 and len({tuple(p) for p in g.predictions}) == 1, workers
        else:
            assert g.weights_sha256.nunique() == 2 and g.seed_init.nunique() == 2, workers
            assert g.predictions.map(tuple).nunique() == 2, workers


@pytest.mark.integration
def test_example_rows_carry_fingerprint_seeds_epochs_and_orchestrator_accuracy(own_out):
    df, out = own_out
    ok = df[df.arch == "digits_cnn"]
    assert ok.fingerprint_id.str.len().eq(12).all() and (ok.accelerator == "cpu").all()
    assert ok.seed_order.notna().all() and (ok.num_threads == 1).all()
    assert (ok.epochs == 2).all() and ok.epoch_seconds.map(len).eq(2).all() and (ok.train_seconds > 0).all()
    assert all([e["epoch"] for e in json.loads(m)] == [1, 2] for m in ok.epoch_metrics)
    labels = pq.read_table(out / "datasets/sklearn_digits.parquet")["label"].to_numpy()
    for r in ok.itertuples():
        assert r.test_accuracy == pytest.approx((np.array(r.predictions) == labels).mean())
        assert r.test_accuracy > 0.5 and 0 < r.test_loss < 2
        digest, norm = runner.weights_digest(load_file(out / "weights" / f"{r.run_id}.safetensors"))
        assert (digest, norm) == (r.weights_sha256, pytest.approx(r.weights_norm))


@pytest.mark.integration
def test_reducer_tables_include_the_example(own_out):
    tables = reduce(str(own_out[1]))
    v = tables["variance"]
    v = v[v.arch == "digits_cnn"]
    assert len(v) == 4 and (v.n_runs == 2).all()  # (control, algo) x (0, 2 workers)
    assert (v[v.noise == "control"].identical_fraction == 1).all()
    assert (v[v.noise == "algo"].identical_fraction == 0).all() and (v[v.noise == "algo"].churn > 0).all()


@pytest.mark.integration
def test_a_broken_user_function_is_a_failed_row_with_one_line_and_the_sweep_goes_on(own_out):
    df = own_out[0]
    failed = {r.arch: r for r in df[df.status == "failed"].itertuples()}
    assert set(failed) == {"raises", "wrong_length", "no_labels"} and len(df[df.status == "failed"]) == 6
    assert failed["raises"].error == ("EntrypointError: tests.user_functions:raises raised ValueError: "
                                      f"no data here, look elsewhere (at {ROOT / 'tests/user_functions.py'}:8 in raises)")
    assert 'line 8, in raises' in (own_out[1] / "logs" / f"{failed['raises'].run_id}.log").read_text()
    assert failed["wrong_length"].error.startswith("ContractError: 9 predictions for 10 labels; the function must")
    assert failed["no_labels"].error.startswith("ContractError: no 'labels' in the returned mapping; the function must")
    assert all("\n" not in r.error for r in failed.values())
    assert (df[df.arch == "digits_cnn"].status == "ok").all()


@pytest.mark.integration
def test_an_entrypoint_sweep_of_control_and_impl_gets_an_overhead_row_from_its_replicas(ray_local, tmp_path):
    """User code has no probe; its control and impl replicas share seeds and differ only in
    determinism, so their paired epoch times give the overhead (epoch 1, with set-up, left out)."""
    doc = {"name": "own-cost", "replicas": 2, "noise": ["control", "impl"],
           "workloads": [EXAMPLE | {"args": {"epochs": 3, "batch_size": 64, "lr": 0.1, "num_workers": 0}}]}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(doc))
    assert sweep.main([str(tmp_path / "s.yaml"), "--out", str(tmp_path / "out")]) == 0
    (row,) = reduce(str(tmp_path / "out"))["overhead"].to_dict("records")
    assert (row["method"], row["arch"], row["accelerator"], row["n_pairs"], row["n_epochs"]) == (
        "replicas", "digits_cnn", "cpu", 2, 8)
    assert np.isfinite([row["overhead_pct"], row["overhead_lo"], row["overhead_hi"]]).all()
    assert row["overhead_lo"] <= row["overhead_hi"] and row["epoch_s_det"] > 0 and row["epoch_s_nondet"] > 0
    assert math.isnan(row["overhead_fill_pct"]) and "drift between them is not cancelled" in row["note"]
