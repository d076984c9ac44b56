"""Compaction of OUT/runs: many per-run files become a few compacted ones, and no row is lost
or counted twice, even when runs are written while compaction runs."""

import subprocess
import sys
import warnings

import pyarrow.compute as pc
import pytest

from orchestrator import store
from tests.conftest import ROOT


def write(root, run_id, status="ok", accuracy=0.5):
    fs, root = store.resolve(str(root))
    store.write_run(fs, root, {"run_id": run_id, "sweep": "t", "status": status, "test_accuracy": accuracy})


def rows(out) -> dict[str, str]:
    t = store.read_runs(str(out), columns=["run_id", "status"])
    return dict(zip(t["run_id"].to_pylist(), t["status"].to_pylist()))


def files(out) -> list[str]:
    return sorted(p.name for p in (out / "runs").glob("*.parquet"))


def test_compaction_merges_run_files_and_readers_see_the_same_rows(tmp_path):
    for i in range(25):
        write(tmp_path, f"r{i:02d}", status="ok" if i % 5 else "failed")
    before = store.read_runs(str(tmp_path)).sort_by("run_id")
    assert store.compact(str(tmp_path), runs_per_file=10) == 25
    names = files(tmp_path)
    assert len(names) == 3 and all(n.startswith(store.COMPACTED_PREFIX) for n in names)
    assert store.read_runs(str(tmp_path)).sort_by("run_id").equals(before)
    assert store.ok_run_ids(str(tmp_path)) == {f"r{i:02d}" for i in range(25) if i % 5}
    assert store.compact(str(tmp_path), at_least=1) == 0  # nothing left to merge


def test_a_rerun_after_compaction_wins_over_its_compacted_row(tmp_path):
    write(tmp_path, "a", status="failed")
    write(tmp_path, "b")
    store.compact(str(tmp_path))
    write(tmp_path, "a", status="ok")  # resume ran it again
    assert rows(tmp_path) == {"a": "ok", "b": "ok"}
    store.compact(str(tmp_path))  # now both compacted files hold "a": the newer one counts
    assert len(files(tmp_path)) == 2 and rows(tmp_path) == {"a": "ok", "b": "ok"}


def test_runs_written_while_compaction_runs_are_neither_lost_nor_duplicated(tmp_path, monkeypatch):
    for i in range(6):
        write(tmp_path, f"r{i}", status="failed")
    read = store._read_ours

    def read_then_runs_finish(fs, paths, columns):
        table = read(fs, paths, columns)  # compaction has read the files it will merge; now, meanwhile:
        write(tmp_path, "new")  # a run finishes for the first time
        write(tmp_path, "r3", status="ok")  # and a retried run rewrites its file
        return table

    monkeypatch.setattr(store, "_read_ours", read_then_runs_finish)
    assert store.compact(str(tmp_path)) == 5  # r3 changed since it was read: kept, not deleted
    monkeypatch.undo()
    assert {"new.parquet", "r3.parquet"} <= set(files(tmp_path))
    t = store.read_runs(str(tmp_path), columns=["run_id", "status"])
    assert t.num_rows == 7 and len(set(t["run_id"].to_pylist())) == 7
    assert rows(tmp_path) == {**{f"r{i}": "failed" for i in range(6)}, "r3": "ok", "new": "ok"}


def test_a_crash_between_writing_and_deleting_counts_each_run_once(tmp_path):
    write(tmp_path, "a")
    write(tmp_path, "b", status="failed")
    kept = {p: p.read_bytes() for p in (tmp_path / "runs").glob("*.parquet")}
    store.compact(str(tmp_path))
    for p, data in kept.items():  # the state a crash after the compacted write, before the deletes, leaves
        p.write_bytes(data)
    assert len(files(tmp_path)) == 3  # a, b and the compacted file holding both
    t = store.read_runs(str(tmp_path), columns=["run_id", "status"])
    assert sorted(t["run_id"].to_pylist()) == ["a", "b"]
    assert pc.sum(pc.equal(t["status"], "ok")).as_py() == 1


def test_foreign_files_are_left_alone_and_still_counted_as_skipped(tmp_path):
    write(tmp_path, "a")
    (tmp_path / "runs" / "theirs.parquet").write_bytes(b"not ours")
    store.compact(str(tmp_path))
    assert (tmp_path / "runs" / "theirs.parquet").exists() and not (tmp_path / "runs" / "a.parquet").exists()
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        assert rows(tmp_path) == {"a": "ok"}


def test_the_compact_command(tmp_path):
    for i in range(3):
        write(tmp_path, f"r{i}")
    res = subprocess.run([sys.executable, "-m", "orchestrator.compact", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True)
    assert res.returncode == 0 and "compacted 3 run files" in res.stdout
    assert len(files(tmp_path)) == 1 and set(rows(tmp_path)) == {"r0", "r1", "r2"}
    res = subprocess.run([sys.executable, "-m", "orchestrator.compact", str(tmp_path / "nope")], cwd=ROOT,
                         capture_output=True, text=True)
    assert res.returncode == 2 and "has no runs/ folder" in res.stderr
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a compacted tree reads without any warning
        store.read_runs(str(tmp_path))


def test_a_failed_write_is_retried_with_backoff_unless_told_to_try_once(tmp_path, monkeypatch):
    """Results get store.WRITE_TRIES tries; the progress file, written from inside Tune's loop and
    rewritten at the next completion, gets one (a backoff there held every trial during an outage)."""
    import pyarrow.fs as pafs

    slept = []
    monkeypatch.setattr(store.time, "sleep", slept.append)
    (tmp_path / "file").write_text("x")  # a parent that is a file: every attempt fails
    for tries, naps in ((store.WRITE_TRIES, [0.5, 1.0, 2.0]), (1, [])):
        slept.clear()
        with pytest.raises(OSError):
            store.write_bytes(pafs.LocalFileSystem(), str(tmp_path / "file" / "progress.json"), b"{}", tries=tries)
        assert slept == naps
