"""Many runs: fail-fast stops a broken workload and the others go on; workers are reused
within one determinism mode and never across; resume reads compacted results."""

import pytest

from orchestrator import compact, store, sweep
from orchestrator.spec import parse, expand
from tests.conftest import cli, write_spec

TINY = {"arch": "mlp", "dataset": "digits", "epochs": 1, "batch_size": 128}
BROKEN = TINY | {"dataset": "cifar10", "dataset_root": "/nonexistent/cifar"}


def runs_of(workload, n=1):
    return expand(parse({"name": "u", "replicas": n, "noise": ["control"], "workloads": [workload]}))


def test_fail_fast_needs_k_equal_failures_in_a_row():
    run, other = runs_of(TINY)[0], runs_of(BROKEN)[0]
    ff = sweep.FailFast(3)
    key = ff.key(run)
    assert ff.waiting(key) and ff.stopped(key) is None
    for _ in range(3):
        ff.record(run, "FileNotFoundError: x")
    assert ff.stopped(key) == "FileNotFoundError: x" and not ff.waiting(key)
    assert ff.stopped(ff.key(other)) is None  # per workload
    mixed = sweep.FailFast(3)
    for error in ("E: a", "E: b", "E: a"):
        mixed.record(run, error)
    assert mixed.stopped(key) is None and not mixed.waiting(key)  # different errors: not systematic
    lucky = sweep.FailFast(2)
    lucky.record(run, None)
    assert not lucky.waiting(key)  # one ok run ends the wait for good
    lucky.record(run, "E")
    lucky.record(run, "E")
    assert lucky.stopped(key) is None
    off = sweep.FailFast(0)
    off.record(run, "E")
    assert off.stopped(key) is None and not off.waiting(key)


def test_the_trainable_does_not_grow_with_the_sweep(ray_local):
    """Tune unpickles the trainable twice per trial: one that held every run made scheduling quadratic."""
    import cloudpickle

    def size(n):
        return len(cloudpickle.dumps(sweep.trainable(ray_local.put({f"run-{i}": "x" * 1000 for i in range(n)}))))

    assert size(10_000) < size(10) + 100


@pytest.mark.integration
def test_fail_fast_skips_a_broken_workload_others_run_on_warm_workers_of_one_mode(ray_local, tmp_path, capsys):
    spec = write_spec(tmp_path / "s.yaml", name="ff", replicas=4, noise=["control", "impl"], workloads=[TINY, BROKEN])
    out = tmp_path / "out"
    assert sweep.main([str(spec), "--out", str(out)]) == 1
    df = store.read_runs(str(out)).to_pandas()
    good, bad = df[df.dataset == "digits"], df[df.dataset == "cifar10"]
    assert len(good) == 8 and (good.status == "ok").all()
    assert len(bad) == 8 and (bad.status == "failed").sum() == 3 and (bad.status == "skipped").sum() == 5
    assert bad.error.nunique() == 1 and bad.error.iloc[0].startswith("FileNotFoundError: dataset 'cifar10'")
    assert bad[bad.status == "skipped"].worker_pid.isna().all()  # never started
    err = capsys.readouterr().err
    # the 3 identical failures are one line with their count
    ours = [line for line in err.splitlines() if line.startswith("failed: ")]  # not Ray workers' own lines
    assert len(ours) == 1 and ours[0].startswith("failed: 3 runs, e.g. ") and "skipped: 5 runs of mlp on cifar10" in err
    # warm workers: processes run several runs each, and a process never changes determinism mode
    ran = df[df.worker_pid.notna()]
    assert ran.groupby("worker_pid").vary_impl.nunique().eq(1).all()
    assert ran.worker_runs.max() > 0 and ran.worker_pid.nunique() < len(ran)
    # resume treats skipped like failed: the broken workload's 8 runs are tried again
    assert sweep.main([str(spec), "--out", str(out)]) == 1
    assert "16 runs, 8 already ok in" in capsys.readouterr().out


@pytest.mark.integration
def test_resume_reads_compacted_results(ray_local, tmp_path, capsys):
    spec = write_spec(tmp_path / "s.yaml", name="compacted", replicas=3, noise=["control"], workloads=[TINY])
    out = tmp_path / "out"
    address = ray_local.get_runtime_context().gcs_address  # the CLI, as a user runs it, on this cluster
    first = cli(str(spec), "--out", str(out), "--address", address)
    assert first.returncode == 0, first.stderr[-2000:]
    assert compact.main([str(out)]) == 0  # in this process (test_compact runs the command)
    assert "compacted 3 run files" in capsys.readouterr().out
    assert sweep.main([str(spec), "--out", str(out)]) == 0
    assert "3 runs, 3 already ok in" in capsys.readouterr().out
    assert [p.name.startswith(store.COMPACTED_PREFIX) for p in (out / "runs").iterdir()] == [True]
    assert store.read_runs(str(out)).num_rows == 3
