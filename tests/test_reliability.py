"""Nothing lost, nothing counted twice: worker deaths, divergence, a killed driver, foreign OUTs
and secrets, on a real local Ray cluster."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
import yaml
from safetensors.numpy import load_file

from orchestrator import store, sweep
from tests.conftest import ROOT, write_spec

pytestmark = pytest.mark.integration
SECRET = "sk-planted-secret-7f3a9c"


def tiny(**extra):
    return {"arch": "mlp", "dataset": "digits", "epochs": 1, "batch_size": 128} | extra


def test_failures_are_retried_recorded_and_the_sweep_carries_on(ray_local, tmp_path, capsys):
    always, once = tmp_path / "always", tmp_path / "once"
    spec = write_spec(tmp_path / "s.yaml", name="faults", replicas=1, max_retries=2, workloads=[
        tiny(arch="tests.faulty:exit_on_build", arch_args={"marker": str(always)}),
        tiny(arch="tests.faulty:exit_once", arch_args={"marker": str(once)}),
        tiny(optimizer="sgd", lr=1e12),  # overflows within the first epoch
        tiny(),
    ])
    assert sweep.main([str(spec), "--out", str(tmp_path / "out")]) == 1
    df = store.read_runs(str(tmp_path / "out")).to_pandas().set_index("arch")
    assert always.read_text().count("attempt") == 3  # first try + max_retries
    died = df.loc["tests.faulty:exit_on_build"]
    assert died.status == "failed" and died.error.startswith("worker died: ")
    log = tmp_path / "out" / "logs" / f"{died.run_id}.log"  # the full error, every attempt, beside the row
    assert log.read_text().strip() == died.error and "Failure # 3" in died.error
    assert df.loc["tests.faulty:exit_once"].status == "ok"  # a retry that succeeds counts once
    assert df.loc["tests.faulty:exit_once"].attempts == 2 and died.attempts == 3
    assert (df.loc["mlp"].attempts == 1).all()
    diverged = df[df.status == "failed"].drop(index="tests.faulty:exit_on_build")
    assert len(diverged) == 1 and diverged.error.iloc[0].startswith("Diverged: diverged at epoch 1 (at ")
    assert (df.status == "ok").sum() == 2 and len(df) == 4
    err = capsys.readouterr().err
    ours = [line for line in err.splitlines() if line.startswith("failed: ")]  # not Ray workers' own lines
    assert len(ours) == 2 and f"(full error: {log})" in err, err
    assert all(len(line) < 500 for line in ours)


def test_foreign_out_is_refused_then_replaced_with_fresh(ray_local, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "runs").mkdir(parents=True)
    (out / "sweep.yaml").write_text(yaml.safe_dump({"name": "someone-elses", "base_seed": 0}))
    (out / "runs" / "theirs.parquet").write_bytes(b"not ours")
    spec = write_spec(tmp_path / "s.yaml", name="mine", replicas=1, workloads=[tiny()])
    assert sweep.main([str(spec), "--out", str(out)]) == 2
    assert "holds results of sweep 'someone-elses'" in capsys.readouterr().err
    assert (out / "runs" / "theirs.parquet").exists()  # refused means untouched
    assert sweep.main([str(spec), "--out", str(out), "--fresh"]) == 0
    err = capsys.readouterr().err
    assert f"--fresh: deleting {out}/runs/" in err and f"--fresh: deleting {out}/sweep.yaml" in err
    assert not (out / "runs" / "theirs.parquet").exists()
    assert yaml.safe_load((out / "sweep.yaml").read_text())["name"] == "mine"


def tree(folder):
    return {f: f.read_bytes() for f in folder.rglob("*") if f.is_file()}


def test_a_refused_sweep_changes_nothing_under_out(ray_local, tmp_path, capsys):
    """Pre-flight refuses (no node offers V100): --fresh has deleted nothing, and an empty OUT
    stays empty (no sweep.yaml left behind to refuse the next sweep)."""
    out, empty = tmp_path / "out", tmp_path / "empty"
    assert sweep.main([str(write_spec(tmp_path / "a.yaml", name="a", replicas=1, workloads=[tiny()])),
                       "--out", str(out)]) == 0
    before = tree(out)
    assert any(f.parent.name == "runs" for f in before)
    pinned = write_spec(tmp_path / "b.yaml", name="b", replicas=1, accelerators=["V100"], resources={"gpus": 1},
                        workloads=[tiny()])
    assert sweep.main([str(pinned), "--out", str(out), "--fresh"]) == 2
    err = capsys.readouterr().err
    assert "no node offers V100" in err and "--fresh: deleting" not in err
    assert tree(out) == before
    empty.mkdir()
    assert sweep.main([str(pinned), "--out", str(empty)]) == 2
    assert not list(empty.iterdir())


def test_sigint_exits_130_then_the_same_command_resumes(ray_local, tmp_path, capsys):
    """Ctrl-C mid-sweep: non-zero exit, how many runs finished, how to resume (not Tune's
    Tuner.restore); the same command then completes with one row per run."""
    spec = write_spec(tmp_path / "s.yaml", name="int", replicas=6, noise=["algo"],
                      workloads=[{"arch": "small_cnn", "dataset": "digits", "epochs": 2, "batch_size": 32}])
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen([sys.executable, "-m", "orchestrator.sweep", str(spec), "--out", str(out)], cwd=ROOT,
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 180
    while not list((out / "runs").glob("*.parquet")) and time.time() < deadline and p.poll() is None:
        time.sleep(0.2)
    os.killpg(p.pid, signal.SIGINT)  # Ctrl-C in a terminal: the whole foreground process group
    stdout, stderr = p.communicate(timeout=120)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(p.pid, signal.SIGKILL)  # its local Ray processes, should any outlive it
    assert p.returncode == 130, stdout[-3000:] + stderr[-2000:]
    assert "run the same command again to resume" in stderr and "Tuner.restore" not in stdout + stderr
    finished = int(stderr.split("interrupted: ")[1].split(" of 6")[0])
    assert 1 <= finished <= len(list((out / "runs").glob("*.parquet"))) < 6, stdout  # runs in flight may land
    assert json.loads((out / "progress.json").read_text())["total"] == 6

    assert sweep.main([str(spec), "--out", str(out)]) == 0  # the same command, on this module's cluster
    printed = capsys.readouterr().out
    already = int(printed.split(" already ok")[0].rsplit(", ", 1)[1])
    assert already >= finished and f"[{already + 1}/6]" in printed  # progress counts the whole sweep
    df = store.read_runs(str(out)).to_pandas()
    assert len(df) == df.run_id.nunique() == 6 and (df.status == "ok").all()


def test_sigkill_of_the_driver_then_resume(ray_local, tmp_path, capsys, monkeypatch):
    """Kill -9 mid-sweep; the same command then runs only what is missing, and OUT holds exactly
    one ok row per run, every file whole. A planted secret appears in no file under OUT (the killed
    sweep's driver and workers had it in their environment, the resuming driver too)."""
    spec = write_spec(tmp_path / "s.yaml", name="kill", replicas=8, noise=["algo"],
                      workloads=[{"arch": "small_cnn", "dataset": "digits", "epochs": 2, "batch_size": 32}])
    out = tmp_path / "out"
    env = {**os.environ, "AWS_SECRET_ACCESS_KEY": SECRET, "MY_SERVICE_TOKEN": SECRET, "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen([sys.executable, "-m", "orchestrator.sweep", str(spec), "--out", str(out)], cwd=ROOT,
                         env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 180
    while len(list((out / "runs").glob("*.parquet"))) < 2 and time.time() < deadline and p.poll() is None:
        time.sleep(0.2)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    time.sleep(2)
    os.killpg(p.pid, signal.SIGKILL)  # the killed driver's local Ray processes, so none write later
    before = {f.name: f.stat().st_mtime_ns for f in (out / "runs").glob("*.parquet")}
    assert 2 <= len(before) < 8

    for name in ("AWS_SECRET_ACCESS_KEY", "MY_SERVICE_TOKEN"):
        monkeypatch.setenv(name, SECRET)
    assert sweep.main([str(spec), "--out", str(out)]) == 0  # the same command, on this module's cluster
    printed = capsys.readouterr().out
    assert f"{len(before)} already ok" in printed and f"{8 - len(before)} to run" in printed
    assert {f: (out / "runs" / f).stat().st_mtime_ns for f in before} == before  # not run again
    runs = sorted((out / "runs").glob("*.parquet"))
    assert len(runs) == 8
    ids = []
    for f in runs:  # every file whole: Parquet footer readable, weights loadable
        t = pq.read_table(f)
        assert t.num_rows == 1 and t["status"][0].as_py() == "ok"
        ids.append(t["run_id"][0].as_py())
        assert load_file(str(store.weights_path(str(out), ids[-1])))
    assert len(set(ids)) == 8 == len(store.read_runs(str(out)))
    for f in out.rglob("*"):
        if f.is_file():
            assert SECRET.encode() not in f.read_bytes(), f


def test_a_probe_only_sweep_reports_no_missing_runs(ray_local, tmp_path, capsys):
    """noise: [] runs probes only: the absent variance table is not reported as a problem."""
    spec = write_spec(tmp_path / "s.yaml", name="probes", noise=[], overhead={"steps": 2, "warmup": 0, "repeats": 1},
                      workloads=[tiny()])
    out = tmp_path / "out"
    assert sweep.main([str(spec), "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert "no runs under" not in printed.out + printed.err and "overhead_pct" in printed.out
    assert json.loads((out / "progress.json").read_text())["total"] == 1


def test_one_writer_per_out(ray_local, tmp_path, capsys):
    """Sweep A runs in its own process; meanwhile a second sweep of another name with --fresh, the
    same spec again, a compact and a reduce on A's OUT are each refused in one line naming A, and
    A finishes with every row. Then a holder killed with SIGKILL leaves a lease the next sweep takes."""
    from orchestrator import compact, reduce

    out = tmp_path / "out"
    a = write_spec(tmp_path / "a.yaml", name="a", replicas=4, noise=["algo"], workloads=[tiny(epochs=2)])
    b = write_spec(tmp_path / "b.yaml", name="b", replicas=1, workloads=[tiny()])
    address = ray_local.get_runtime_context().gcs_address  # A joins this module's cluster: no cluster start
    p = subprocess.Popen([sys.executable, "-m", "orchestrator.sweep", str(a), "--out", str(out), "--address", address],
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    while not (out / "sweep.yaml").exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.2)
    for command in ([str(b), "--out", str(out), "--fresh"], [str(a), "--out", str(out)]):
        assert sweep.main(command) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and f"is being written by `python -m sweep {a} --out {out} --address {address}` (pid {p.pid}" in err
    assert compact.main([str(out)]) == 2 and reduce.main([str(out)]) == 2
    assert "is being written by" in capsys.readouterr().err
    stdout, stderr = p.communicate(timeout=600)
    assert p.returncode == 0, stderr[-2000:]
    df = store.read_runs(str(out)).to_pandas()
    assert len(df) == 4 and (df.status == "ok").all() and set(df.sweep) == {"a"}  # nothing of B's, nothing lost

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from orchestrator import lease\n"
                               f"with lease.held({str(out)!r}, 'a holder'):\n print('held', flush=True); time.sleep(600)"],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    assert reduce.main([str(out)]) == 2
    holder.kill()
    holder.wait()
    assert reduce.main([str(out)]) == 0  # the dead holder's lease went with its process


def test_two_text_workloads_over_different_files_keep_their_own_labels(ray_local, tmp_path):
    """Labels are keyed by dataset name, root and options: each text file's test set is its own file
    under OUT/datasets, and each group's per-example statistics read its own."""
    import pyarrow.parquet as pq

    from orchestrator.reduce import reduce

    texts = {"fox": "the quick brown fox jumps over the lazy dog. " * 40, "cat": "a cat sat on the mat; " * 50}
    workloads = []
    for name, text in texts.items():
        (tmp_path / f"{name}.txt").write_text(text, encoding="utf-8")
        workloads.append({"arch": "gpt", "dataset": "text", "dataset_root": str(tmp_path / f"{name}.txt"),
                          "dataset_args": {"context_length": 16, "test_fraction": 0.2},
                          "arch_args": {"n_layer": 1, "n_head": 2, "n_embd": 16}, "epochs": 1, "batch_size": 32})
    out = tmp_path / "out"
    spec = write_spec(tmp_path / "s.yaml", name="texts", replicas=2, noise=["algo"], workloads=workloads)
    assert sweep.main([str(spec), "--out", str(out)]) == 0
    files = sorted((out / "datasets").glob("text-*.parquet"))
    sizes = {pq.read_metadata(f).num_rows for f in files}
    assert len(files) == 2 and len(sizes) == 2, files
    df = store.read_runs(str(out)).to_pandas()
    assert {len(p) for p in df.predictions} == sizes  # each run's predictions match one labels file
    variance = reduce(str(out))["variance"]
    assert len(variance) == 2 and variance.acc_std_sampling.notna().all()
