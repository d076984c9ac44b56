"""The determinism-overhead probe: real probes on the CPU write every step of every mode and a
profile of real ops, their parts add up to the total, ops with no deterministic kernel are
recorded by name (never a crash), and a sweep with an `overhead:` section schedules probes next to
the runs and skips finished probes on resume."""

import json
import math
import warnings
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from orchestrator import metrics, probe, reduce, spec, store, sweep, worker
from tests.conftest import write_spec

WORKLOAD = {"arch": "small_cnn", "dataset": "synthetic", "batch_size": 16, "augmentation": "crop+flip",
            "dataset_args": {"n_train": 64, "n_test": 16, "image_size": 16}}


def unpool_cnn(image_shape, num_classes):
    """A model with MaxUnpool2d, whose CPU kernel has no deterministic implementation: under
    use_deterministic_algorithms(True) torch raises `max_unpooling2d_forward_out does not have ...`."""
    c = image_shape[0]

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(c, 4, 3, padding=1)
            self.pool, self.unpool = nn.MaxPool2d(2, return_indices=True), nn.MaxUnpool2d(2)
            self.head = nn.Linear(4 * image_shape[1] * image_shape[2], num_classes)

        def forward(self, x):
            y, idx = self.pool(self.conv(x))
            return self.head(self.unpool(y, idx).flatten(1))

    return Net()


def probe_spec(workload=WORKLOAD, tooling=None, **overhead) -> spec.ProbeSpec:
    doc = {"name": "probe", "noise": [], "overhead": {"steps": 6, "warmup": 2, "repeats": 2} | overhead,
           "workloads": [workload], **({"tooling": tooling} if tooling else {})}
    (p,) = spec.expand_probes(spec.parse(doc))
    return p


def read(out, p, path=store.overhead_path):
    return pq.read_table(path(str(out), p.probe_id)).to_pandas()


@pytest.fixture(scope="module")
def probed(tmp_path_factory):
    """One real three-mode probe of small_cnn on the CPU (2 repeats), shared by the tests below."""
    out, p = tmp_path_factory.mktemp("probe"), probe_spec()
    result = probe.run(p, str(out))
    assert result["status"] == "ok", result
    return out, p


def test_probe_writes_every_step_of_every_mode(probed):
    out, p = probed
    df = read(out, p)
    assert len(df) == 3 * 2 * 6 and df.groupby("mode").size().to_dict() == {"det": 12, "det_nofill": 12, "nondet": 12}
    # the modes rotate from one repeat to the next (Latin square)
    order = df.drop_duplicates("block").sort_values("block")[["block", "repeat", "mode"]].values.tolist()
    assert order == [[0, 0, "det"], [1, 0, "det_nofill"], [2, 0, "nondet"],
                     [3, 1, "det_nofill"], [4, 1, "nondet"], [5, 1, "det"]]
    assert sorted(df[df.block == 0].step) == list(range(6))  # warm-up steps are not rows
    assert df.step_ms.between(0.01, 10_000).all()
    # same weights, data and crops in every block, and a CPU runs the same kernels in every mode
    assert df.block_loss.nunique() == 1
    assert (df.nondeterministic_ops == "").all()
    assert (df.accelerator == "cpu").all() and df.fingerprint_id.str.len().eq(12).all()
    assert (df.arch == "small_cnn").all() and (df.probe_id == p.probe_id).all()
    flags = {m: json.loads(df[df["mode"] == m].impl_flags.iloc[0]) for m in probe.MODE_SWITCHES if m in set(df["mode"])}
    assert flags["det"]["use_deterministic_algorithms"] and flags["det"]["warn_only"]
    assert flags["det"]["fill_uninitialized_memory"]  # torch's default in deterministic mode
    assert flags["det_nofill"]["use_deterministic_algorithms"] and not flags["det_nofill"]["fill_uninitialized_memory"]
    assert not flags["nondet"]["use_deterministic_algorithms"]
    assert torch.utils.deterministic.fill_uninitialized_memory  # torch's default again for the next trial


def test_three_mode_probe_gives_finite_parts_that_add_up_to_the_total(probed):
    out, p = probed
    (o,) = reduce.overhead_table(*store.resolve(str(out))).to_dict("records")
    assert (o["method"], o["n_pairs"], o["n_steps"], o["note"]) == ("probe", 2, 36, "")
    for part in ("overhead", "overhead_kernels", "overhead_fill"):
        assert np.isfinite([o[f"{part}_pct"], o[f"{part}_lo"], o[f"{part}_hi"]]).all(), part
        assert o[f"{part}_lo"] <= o[f"{part}_hi"]
    assert o["overhead_kernels_pct"] + o["overhead_fill_pct"] == pytest.approx(o["overhead_pct"], abs=1e-9)
    assert o["overhead_lo"] <= o["overhead_pct"] <= o["overhead_hi"]  # per-repeat ratios' centre, not the medians'
    assert math.isnan(o["overhead_inductor_pct"])  # not compiled


def test_profile_names_real_ops_and_sees_the_fill(probed):
    """The profiled det and nondet blocks: real aten ops, ranked by growth; in det mode torch
    NaN-fills new tensors, so aten::fill_ runs more often per step (a count, not a timing)."""
    out, p = probed
    ops = read(out, p, probe.ops_path)
    assert ops.op.str.startswith("aten::").sum() >= 5 and (ops.probe_id == p.probe_id).all()
    assert (ops.delta_ms == ops.ms_det - ops.ms_nondet).all() and ops.delta_ms.is_monotonic_decreasing
    assert (ops[["ms_det", "ms_nondet", "calls_det", "calls_nondet"]] >= 0).all().all()
    assert set(ops.clock) == {"cpu"} and set(ops.profiled_mode) == {"det"} and set(ops.profiled_steps) == {6}
    fill = ops[ops.op == "aten::fill_"].iloc[0]
    assert fill.calls_det > fill.calls_nondet
    assert store.done_probe_ids(str(out)) == {p.probe_id}  # the ops file is not a second probe
    table = reduce.overhead_ops_table(*store.resolve(str(out)))
    assert 0 < len(table) <= reduce.TOP_OPS and table.delta_ms.is_monotonic_decreasing
    assert table.op.str.startswith("aten::").any() and (table.n_probes == 1).all()
    assert {"arch", "workload", "accelerator", "nondeterministic_ops"} <= set(table.columns)


def test_both_modes_run_at_the_probes_cudnn_benchmark_setting(tmp_path):
    """The overhead is that of the determinism switches alone: autotuning is the same in every mode."""
    for bench in (False, True):
        p = probe_spec(tooling={"cudnn_benchmark": [bench]}, steps=2, warmup=1, repeats=1)
        assert p.cudnn_benchmark is bench and probe.run(p, str(tmp_path))["status"] == "ok"
        df = read(tmp_path, p)
        flags = [json.loads(f) for f in df.impl_flags]
        assert {f["cudnn_benchmark"] for f in flags} == {bench} and (df.cudnn_benchmark == bench).all()
        assert {f["use_deterministic_algorithms"] for f in flags} == {True, False}
        assert df.fingerprint_complete.all() and (df.fingerprint_missing == "").all()


def test_fill_of_uninitialised_memory_can_be_left_out_and_is_restored(tmp_path):
    p = probe_spec(fill_uninitialized_memory=False, steps=2, warmup=1)
    assert p.probe_id != probe_spec().probe_id and probe.modes(p) == ("det_nofill", "nondet")
    assert probe.run(p, str(tmp_path))["status"] == "ok"
    df = read(tmp_path, p)
    assert set(df["mode"]) == {"det_nofill", "nondet"}
    assert df.impl_flags.str.contains('"fill_uninitialized_memory": false').all()
    assert set(read(tmp_path, p, probe.ops_path).profiled_mode) == {"det_nofill"}
    assert torch.utils.deterministic.fill_uninitialized_memory  # torch's default again for the next trial
    o = reduce.overhead_table(*store.resolve(str(tmp_path))).iloc[0]
    assert np.isfinite(o["overhead_kernels_pct"]) and math.isnan(o["overhead_pct"]) and "kernels part only" in o["note"]


def test_modes_rotate_as_a_latin_square_balanced_over_two_cycles():
    modes = ("det", "det_nofill", "nondet")
    rounds = [probe.block_order(modes, r) for r in range(6)]
    assert all(sorted(r) == sorted(modes) for r in rounds)
    for position in range(3):  # every mode twice in every position
        assert sorted(r[position] for r in rounds) == sorted(modes * 2)
    follows = Counter((r[i], r[i + 1]) for r in rounds for i in range(2))
    assert len(follows) == 6 and set(follows.values()) == {2}  # every mode after every other, twice
    assert [probe.block_order(("det", "nondet"), r) for r in range(2)] == [("det", "nondet"), ("nondet", "det")]


def test_compiled_probes_time_what_inductors_deterministic_mode_adds():
    """det_noinductor: deterministic kernels with inductor's own deterministic mode off; the other
    deterministic modes turn it on, as compiled impl-fixed replicas run."""
    import torch._inductor.config as inductor

    p = probe_spec(tooling={"compile": [True]})
    assert probe.modes(p) == ("det", "det_nofill", "det_noinductor", "nondet")
    assert set(probe.MODE_SWITCHES) == {m for pair in metrics.COST_PARTS.values() for m in pair}
    try:
        for mode, expected in (("det_noinductor", False), ("det_nofill", True), ("nondet", False)):
            flags = probe.set_mode(mode, p)
            assert flags["inductor_deterministic"] is expected and inductor.deterministic is expected, mode
            assert flags["use_deterministic_algorithms"] is (mode != "nondet")
    finally:
        probe.set_mode("nondet", probe_spec())
        torch.utils.deterministic.fill_uninitialized_memory = True


def test_an_op_without_deterministic_kernel_is_recorded_not_fatal(tmp_path):
    # torch really raises for this model's MaxUnpool2d on the CPU ...
    model = unpool_cnn((1, 8, 8), 10)
    torch.use_deterministic_algorithms(True)
    try:
        with pytest.raises(RuntimeError, match="does not have a deterministic implementation"):
            model(torch.randn(2, 1, 8, 8))
    finally:
        torch.use_deterministic_algorithms(False)
    # ... and the probe records it and keeps timing
    p = probe_spec({"arch": "tests.test_probe:unpool_cnn", "dataset": "digits", "batch_size": 32})
    assert ":" not in p.probe_id
    result = probe.run(p, str(tmp_path))
    assert result["status"] == "ok", result
    df = read(tmp_path, p)
    assert len(df) == 36 and set(df["mode"]) == {"det", "det_nofill", "nondet"}
    assert (df.nondeterministic_ops == "max_unpooling2d_forward_out").all()


def test_recorder_names_alerts_and_lets_other_warnings_through():
    from torch._prims_common import alert_not_deterministic

    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with warnings.catch_warnings(record=True) as outer:
            warnings.simplefilter("always")
            with probe.recording_nondeterministic_ops() as ops:
                alert_not_deterministic("fake_scatter_op")
                alert_not_deterministic("fake_scatter_op")
                warnings.warn("unrelated", UserWarning, stacklevel=1)
    finally:
        torch.use_deterministic_algorithms(False)
    assert ops == {"fake_scatter_op"}
    assert [str(w.message) for w in outer] == ["unrelated"]
    assert probe.nondeterministic_op("index_add_cuda_ does not have a deterministic implementation, but you set "
                                     "'torch.use_deterministic_algorithms(True)'. ...") == "index_add_cuda_"
    assert probe.nondeterministic_op("CUDA out of memory") is None


def test_a_failing_probe_is_returned_not_raised_and_writes_nothing(tmp_path):
    p = probe_spec({**WORKLOAD, "arch_args": {"no_such_option": 1}})
    result = probe.run(p, str(tmp_path))
    assert result["status"] == "failed" and "no_such_option" in result["error"]
    assert store.done_probe_ids(str(tmp_path)) == set()


def test_expand_probes_one_per_workload_and_accelerator_on_a_whole_device():
    doc = {"name": "e", "accelerators": ["T4", "A100"], "resources": {"cpus": 2, "gpus": 0.5},
           "tooling": {"num_threads": [4, 1], "precision": ["bf16", "fp32"]},
           "workloads": [{"arch": "small_cnn", "dataset": "digits"}, {"arch": "resnet18", "dataset": "digits"}]}
    assert spec.expand_probes(spec.parse(doc)) == []  # no overhead section, no probes
    probes = spec.expand_probes(spec.parse(doc | {"overhead": {}}))
    assert [(p.workload.arch, p.accelerator) for p in probes] == [
        ("small_cnn", "T4"), ("small_cnn", "A100"), ("resnet18", "T4"), ("resnet18", "A100")]
    assert all(p.gpus == 1 and p.cpus == 4 and p.num_threads == 4 and p.precision == "bf16" for p in probes)
    assert probes[0].overhead == spec.Overhead(steps=50, warmup=5, repeats=6)
    assert worker.process_resources(probes[0]) == {"CPU": 4, "GPU": 1, "accelerator_type:T4": 0.001}
    again = spec.expand_probes(spec.parse(doc | {"overhead": {}}))
    longer = spec.expand_probes(spec.parse(doc | {"overhead": {"steps": 100}}))
    assert [p.probe_id for p in probes] == [p.probe_id for p in again]
    assert len({p.probe_id for p in probes + longer}) == 8
    run_ids = {r.run_id for r in spec.expand(spec.parse(doc | {"overhead": {}}))}
    assert not run_ids & {p.probe_id for p in probes}
    cpu = spec.expand_probes(spec.parse(doc | {"overhead": {}, "accelerators": ["any"], "resources": {}}))
    assert {p.gpus for p in cpu} == {0}


def test_overhead_section_rejects_unknown_keys_and_bad_values():
    base = {"name": "e", "workloads": [{"arch": "mlp", "dataset": "digits"}]}
    with pytest.raises(spec.SpecError, match="overhead.step: unknown key"):
        spec.parse(base | {"overhead": {"step": 5}})
    with pytest.raises(spec.SpecError, match="overhead.repeats"):
        spec.parse(base | {"overhead": {"repeats": 0}})
    with pytest.raises(spec.SpecError, match="noise: empty, so there are no replica runs"):
        spec.parse(base | {"noise": []})


@pytest.mark.integration
def test_sweep_with_overhead_section_runs_probes_and_resumes(ray_local, tmp_path, capsys):
    cfg = write_spec(tmp_path / "s.yaml", name="ovh", replicas=1, noise=["control"],
                     overhead={"steps": 5, "warmup": 1, "repeats": 2},
                     workloads=[{"arch": "small_cnn", "dataset": "digits", "epochs": 1, "batch_size": 64,
                                 "lr": 0.002, "optimizer": "adam"},
                                {"arch": "mlp", "dataset": "digits", "epochs": 1, "batch_size": 64}])
    out = tmp_path / "out"
    assert sweep.main([str(cfg), "--out", str(out)]) == 0
    files = sorted((out / "overhead").glob("*.parquet"))
    assert len(files) == 2 and len(list((out / "runs").glob("*.parquet"))) == 2  # probes are not runs
    stamps = {f: f.stat().st_mtime_ns for f in files}
    table = reduce.overhead_table(*store.resolve(str(out)))
    assert sorted(table.arch) == ["mlp", "small_cnn"] and table.n_steps.eq(30).all()
    assert len(list((out / "overhead" / "ops").glob("*.parquet"))) == 2  # a profile per probe, not a probe
    assert "overhead_pct" in capsys.readouterr().out
    assert sweep.main([str(cfg), "--out", str(out)]) == 0  # resume: nothing left to run
    assert "0 to run; 2 overhead probes, 0 to run" in capsys.readouterr().out
    assert {f: f.stat().st_mtime_ns for f in files} == stamps


@pytest.mark.integration
def test_a_failed_probe_fails_the_sweep_and_is_retried_on_resume(ray_local, tmp_path, capsys):
    cfg = write_spec(tmp_path / "s.yaml", name="bad", noise=[], overhead={"steps": 2, "warmup": 0, "repeats": 1},
                     workloads=[{**WORKLOAD, "arch_args": {"no_such_option": 1}}])
    out = tmp_path / "out"
    assert sweep.main([str(cfg), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "failed: probe-small_cnn-synthetic-any-" in err and "wrote no result" in err
    assert not list((out / "overhead").glob("*.parquet")) and not (out / "runs").exists()
    assert sweep.main([str(cfg), "--out", str(out)]) == 1
    assert "1 overhead probes, 1 to run" in capsys.readouterr().out  # no file, so it runs again
