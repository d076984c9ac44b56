"""The reducer on real results trees written with store.write_run and safetensors, end to end."""

import json
import math
import subprocess
import warnings
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from safetensors.numpy import save_file
from scipy import stats

from orchestrator import metrics, reduce, store

ROOT = Path(__file__).resolve().parents[1]
LABELS = np.array([0, 1, 0, 1, 0, 1, 0, 1], dtype=np.int32)
SUBGROUPS = np.array([0, 0, 0, 0, 1, 1, 1, 1], dtype=np.int32)
BASE = np.zeros((2, 3), dtype=np.float32)


def weights(dw: dict[tuple[int, int], float] | None = None) -> dict[str, np.ndarray]:
    """A tiny model: w (2, 3) = BASE plus the given entries, a bias, and an integer buffer that
    no distance may count."""
    w = BASE.copy()
    for ij, v in (dw or {}).items():
        w[ij] += v
    return {"w": w, "b": np.full(2, 0.5, dtype=np.float32), "steps": np.array(7, dtype=np.int64)}


def digest(tensors: dict[str, np.ndarray]) -> str:
    """weights_sha256 as the runner computes it, from torch tensors (reduce checks files against it)."""
    import torch

    from orchestrator.runner import weights_digest

    return weights_digest({k: torch.from_numpy(v.copy()) for k, v in tensors.items()})[0]


def write_run(root: Path, run_id: str, preds=None, tensors=None, *, noise="algo", replica=0, num_threads=1,
              status="ok", seeds=(1, 2, 3), lr=0.01, **columns) -> None:
    """One run as the runner writes it: weights file first, then its row (RUN_SCHEMA names, and
    `columns` over the defaults)."""
    row = {"run_id": run_id, "sweep": "t", "arch": "mlp", "dataset": "toy", "noise": noise, "replica": replica,
           "seed_init": seeds[0], "seed_order": seeds[1], "seed_augment": seeds[2],
           "accelerator_requested": "any", "accelerator": "cpu", "fingerprint_id": "fp0",
           "num_threads": num_threads, "precision": "fp32", "channels_last": False, "compiled": False,
           "status": status, "epochs": 1,
           "spec_json": json.dumps({"workload": {"arch": "mlp", "dataset": "toy", "lr": lr, "replicas": 3},
                                    "num_threads": num_threads, "precision": "fp32"})}
    if status == "ok":
        preds = np.asarray(preds, dtype=np.int32)
        correct = preds == LABELS
        row |= {"test_accuracy": float(correct.mean()), "predictions": preds.tolist(),
                "per_class_accuracy": [float(correct[LABELS == c].mean()) for c in (0, 1)],
                "weights_sha256": digest(tensors),
                "weights_norm": math.sqrt(sum(float((t.astype(np.float64) ** 2).sum())
                                              for t in tensors.values() if t.dtype.kind == "f"))}
        (root / "weights").mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(root / "weights" / f"{run_id}.safetensors"))
    else:
        row["error"] = "Diverged: diverged at epoch 1"
    fs, r = store.resolve(str(root))
    store.write_run(fs, r, row | columns)


P0 = [0, 1, 0, 1, 0, 1, 0, 1]  # all correct
P1 = [1, 1, 0, 1, 0, 1, 0, 1]  # differs from P0 at example 0 (subgroup 0, a false positive)
P2 = [0, 1, 0, 1, 0, 1, 0, 0]  # differs from P0 at 7, from P1 at 0 and 7 (subgroup 1, a false negative)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """control: 3 identical runs on 1 thread and 3 more on 2 threads (same seeds, other bits);
    algo: 3 runs with weights on a 3-4-5 triangle plus one failed run; init: a single run; a
    foreign Parquet file; labels with two subgroups; and one determinism-overhead probe."""
    for r in range(3):
        write_run(tmp_path, f"c1-{r}", P0, weights(), noise="control", replica=r)
        write_run(tmp_path, f"c2-{r}", P1, weights({(0, 0): 1.0}), noise="control", replica=r, num_threads=2)
    write_run(tmp_path, "a-0", P0, weights(), replica=0, seeds=(10, 20, 30))
    write_run(tmp_path, "a-1", P1, weights({(0, 0): 3.0}), replica=1, seeds=(11, 21, 31))
    write_run(tmp_path, "a-2", P2, weights({(1, 2): 4.0}), replica=2, seeds=(12, 22, 32))
    write_run(tmp_path, "a-3", status="failed", replica=3, seeds=(13, 23, 33))
    write_run(tmp_path, "i-0", P0, weights(), noise="init")
    pq.write_table(pa.table({"something": [1, 2]}), tmp_path / "runs" / "foreign.parquet")
    (tmp_path / "datasets").mkdir()
    pq.write_table(pa.table({"label": LABELS, "subgroup": SUBGROUPS}, schema=store.LABELS_SCHEMA),
                   tmp_path / "datasets" / "toy.parquet")
    (tmp_path / "overhead").mkdir()
    n = 4  # steps per block; det steps take 15 ms, non-det 10 ms: +50%
    pq.write_table(pa.table({
        "probe_id": ["p0"] * 4 * n, "arch": ["mlp"] * 4 * n, "accelerator_requested": ["any"] * 4 * n,
        "accelerator": ["cpu"] * 4 * n, "fingerprint_id": ["fp0"] * 4 * n,
        "mode": (["det"] * n + ["nondet"] * n) * 2, "step_ms": ([15.0] * n + [10.0] * n) * 2,
        "block": [0] * n + [1] * n + [2] * n + [3] * n}), tmp_path / "overhead" / "p0.parquet")
    return tmp_path


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator.reduce", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def by_noise(df: pd.DataFrame, noise: str, num_threads: int = 1) -> pd.Series:
    rows = df[(df["noise"] == noise) & (df["num_threads"] == num_threads)]
    assert len(rows) == 1
    return rows.iloc[0]


def test_cli_end_to_end(tree: Path):
    res = cli(str(tree))
    assert res.returncode == 0, res.stderr
    assert "skipped 1 unreadable, damaged or foreign Parquet file(s) under" in res.stderr
    assert "## variance" in res.stdout and "## cross_stack" in res.stdout and "## overhead" in res.stdout
    for name in ("variance", "subgroups", "cross_stack", "overhead"):
        for ext in ("md", "csv", "parquet"):
            assert (tree / "tables" / f"{name}.{ext}").is_file()
    v = pd.read_parquet(tree / "tables" / "variance.parquet")
    csv = pd.read_csv(tree / "tables" / "variance.csv").fillna({"note": ""})
    pd.testing.assert_frame_equal(v, csv, check_dtype=False)
    assert len(v) == 4  # control×1 thread, control×2 threads, algo, init
    assert (tree / "tables" / "variance.md").read_text().strip() in res.stdout

    ctrl = by_noise(v, "control")
    assert (ctrl["n_runs"], ctrl["n_failed"], ctrl["acc_std"], ctrl["churn"], ctrl["l2"]) == (3, 0, 0.0, 0.0, 0.0)
    assert ctrl["identical_fraction"] == 1.0 and ctrl["acc_std_lo"] == ctrl["acc_std_hi"] == 0.0
    assert ctrl["per_class_std_max"] == 0.0 and pd.isna(ctrl["worst_class"])  # no class moves

    algo = by_noise(v, "algo")
    assert (algo["n_runs"], algo["n_failed"], algo["n_test"]) == (3, 1, 8)
    assert algo["churn"] == pytest.approx((1 / 8 + 1 / 8 + 2 / 8) / 3)
    assert algo["l2"] == pytest.approx((3 + 4 + 5) / 3)
    norms = [math.sqrt(0.5 + a ** 2) for a in (0, 3, 4)]  # b = (0.5, 0.5) and one entry of w
    assert algo["l2_rel"] == pytest.approx(4 / np.mean(norms))
    assert algo["identical_fraction"] == 0.0
    acc = [1.0, 7 / 8, 7 / 8]
    assert algo["acc_mean"] == pytest.approx(np.mean(acc)) and algo["acc_std"] == pytest.approx(np.std(acc, ddof=1))
    # examples 0 and 7 each flip in one of 3 runs (ddof=1 variance 1/3 each): (2/3) / 8²
    assert algo["acc_std_sampling"] == pytest.approx(math.sqrt(1 / 96))
    assert algo["acc_std_lo"] <= algo["acc_std"] <= algo["acc_std_hi"]
    # accuracy variance 1/192 is below the per-example 1/96: the flips explain it all
    assert algo["acc_std_dist"] == 0.0 and algo["acc_std_dist_lo"] == 0.0
    assert algo["acc_std_dist_hi"] == pytest.approx(math.sqrt(2 / 192 / stats.chi2.ppf(0.025, 2) - 1 / 96))
    # class 0 accuracy per run 1, 3/4, 1; class 1: 1, 1, 3/4 -> equal spreads, lowest index wins
    assert algo["per_class_std_max"] == pytest.approx(np.std([1, 0.75, 1], ddof=1)) and algo["worst_class"] == 0
    assert algo["subgroup_acc_std_max"] == pytest.approx(np.std([1, 0.75, 1], ddof=1))
    # replicas 0-2 of algo pair with replicas 0-2 of control: 3 pairs are too few for the paired
    # sign-flip scale test (its smallest p is 0.25), so no p-value, and the note says why
    assert math.isnan(algo["p_vs_control"])
    assert "p_vs_control: paired Brown–Forsythe: too few pairs (3; 4 needed)" in algo["note"]
    assert math.isnan(algo["p_vs_algo"])
    assert (ctrl["acc_std_sampling"], ctrl["acc_std_dist"], ctrl["acc_std_dist_hi"]) == (0.0, 0.0, 0.0)

    single = by_noise(v, "init")
    assert single["n_runs"] == 1 and single["acc_mean"] == 1.0
    assert all(math.isnan(single[c]) for c in ("acc_std", "acc_std_lo", "churn", "l2", "p_vs_control"))
    assert "1 ok run(s)" in single["note"]

    subs = pd.read_parquet(tree / "tables" / "subgroups.parquet")
    s0 = subs[(subs["noise"] == "algo") & (subs["subgroup"] == 0)].iloc[0]
    s1 = subs[(subs["noise"] == "algo") & (subs["subgroup"] == 1)].iloc[0]
    assert s0["n_examples"] == 4 and s0["fpr_mean"] == pytest.approx(1 / 6) and s0["fnr_mean"] == 0.0
    assert s1["fpr_mean"] == 0.0 and s1["fnr_mean"] == pytest.approx(1 / 6)
    assert s0["fpr_std"] == pytest.approx(np.std([0, 0.5, 0], ddof=1))

    x = pd.read_parquet(tree / "tables" / "cross_stack.parquet")
    assert len(x) == 1  # only the control runs share seeds across thread counts
    row = x.iloc[0]
    assert (row["noise"], row["num_threads_a"], row["num_threads_b"], row["n_pairs"]) == ("control", 1, 2, 3)
    assert (row["identical_fraction"], row["churn"], row["l2"]) == (0.0, 1 / 8, 1.0)

    o = pd.read_parquet(tree / "tables" / "overhead.parquet").iloc[0]
    assert (o["arch"], o["accelerator"], o["step_ms_det"], o["step_ms_nondet"]) == ("mlp", "cpu", 15.0, 10.0)
    assert (o["overhead_pct"], o["overhead_lo"], o["overhead_hi"], o["n_steps"]) == (50.0, 50.0, 50.0, 16)


def test_group_with_one_run_is_nan_not_a_crash(tmp_path: Path):
    write_run(tmp_path, "only", P0, weights())
    with pytest.warns(UserWarning, match="skipped 1"):
        pq.write_table(pa.table({"x": [1]}), tmp_path / "runs" / "foreign.parquet")
        tables = reduce.reduce(str(tmp_path))
    row = tables["variance"].iloc[0]
    assert row["n_runs"] == 1 and math.isnan(row["acc_std"]) and math.isnan(row["l2"]) and row["note"]
    assert pd.isna(row["worst_class"])
    assert tables["overhead"].empty and "no determinism-overhead probes" in reduce.format_markdown(tables["overhead"])
    assert (tmp_path / "tables" / "overhead.md").read_text().startswith("no determinism-overhead probes")


def test_all_failed_group_counts_failures(tmp_path: Path):
    write_run(tmp_path, "f0", status="failed")
    write_run(tmp_path, "f1", status="failed", replica=1)
    row = reduce.reduce(str(tmp_path), fmt=())["variance"].iloc[0]
    assert (row["n_runs"], row["n_failed"]) == (0, 2) and math.isnan(row["acc_mean"])


def test_worker_death_row_lands_in_its_group(tmp_path: Path):
    # runner.base_row for a worker that died: no fingerprint, so num_threads comes from its spec
    write_run(tmp_path, "ok0", P0, weights(), num_threads=2)
    write_run(tmp_path, "ok1", P1, weights({(0, 0): 1.0}), num_threads=2, replica=1)
    fs, root = store.resolve(str(tmp_path))
    spec = {"workload": {"arch": "mlp", "dataset": "toy", "lr": 0.01}, "num_threads": 2, "precision": "fp32",
            "channels_last": False, "compile": False}
    store.write_run(fs, root, {"run_id": "dead", "arch": "mlp", "dataset": "toy", "noise": "algo", "replica": 2,
                               "accelerator_requested": "any", "status": "failed", "error": "worker died",
                               "spec_json": json.dumps(spec)})
    v = reduce.reduce(str(tmp_path), fmt=())["variance"]
    assert len(v) == 1 and (v.iloc[0]["n_runs"], v.iloc[0]["n_failed"], v.iloc[0]["num_threads"]) == (2, 1, 2)


def test_different_learning_rates_never_pool(tmp_path: Path):
    write_run(tmp_path, "lr1", P0, weights(), lr=0.1)
    write_run(tmp_path, "lr2", P1, weights(), lr=0.2)
    v = reduce.reduce(str(tmp_path), fmt=())["variance"]
    assert len(v) == 2 and v["workload"].nunique() == 2
    pooled = reduce.reduce(str(tmp_path), by=["arch", "noise"], fmt=())["variance"]
    assert len(pooled) == 1 and pooled.iloc[0]["churn"] == 1 / 8


@pytest.mark.filterwarnings("ignore:skipped 1")
def test_l2_streams_in_chunks(tree: Path, monkeypatch):
    fs, root = store.resolve(str(tree))
    runs = reduce.load_runs(str(tree), list(reduce.DEFAULT_BY))
    algo = runs.meta[(runs.meta["noise"] == "algo") & (runs.meta["status"] == "ok")]
    whole = reduce.l2_matrix(fs, root, algo)[0]
    monkeypatch.setattr(reduce, "CHUNK", 2)  # one row of w per slice
    np.testing.assert_allclose(reduce.l2_matrix(fs, root, algo)[0], whole, rtol=1e-12)
    np.testing.assert_allclose(whole, [[0, 3, 4], [3, 0, 5], [4, 5, 0]], rtol=1e-12)


def test_bfloat16_weights(tmp_path: Path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file as save_torch

    from orchestrator.runner import weights_digest

    for r, v, preds, seeds in (("a", 0.0, P0, (1, 2, 3)), ("b", 3.0, P1, (4, 5, 6))):  # stored as bfloat16
        w = torch.zeros(2, 3, dtype=torch.bfloat16)
        w[0, 0] = v
        state = {"w": w, "b": torch.full((2,), 0.5, dtype=torch.bfloat16)}
        write_run(tmp_path, r, preds, weights(), seeds=seeds, weights_sha256=weights_digest(state)[0])
        save_torch(state, str(tmp_path / "weights" / f"{r}.safetensors"))
    assert reduce.reduce(str(tmp_path), fmt=())["variance"].iloc[0]["l2"] == pytest.approx(3.0)


def test_missing_weights_file_is_a_note(tmp_path: Path):
    write_run(tmp_path, "a", P0, weights())
    write_run(tmp_path, "b", P1, weights({(0, 0): 3.0}), replica=1)
    (tmp_path / "weights" / "b.safetensors").unlink()
    row = reduce.reduce(str(tmp_path), fmt=())["variance"].iloc[0]
    assert math.isnan(row["l2"]) and "no weights file for 1 run(s)" in row["note"] and row["churn"] == 1 / 8


def test_a_flipped_weight_byte_is_named_left_out_and_rerun(tmp_path: Path):
    write_run(tmp_path, "a", P0, weights())
    write_run(tmp_path, "b", P1, weights({(0, 0): 3.0}), replica=1)
    path = tmp_path / "weights" / "b.safetensors"
    assert reduce.file_digest(str(path)) == digest(weights({(0, 0): 3.0}))  # the file hashes as the runner hashed it
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0x40  # one bit of the bias's last float
    path.write_bytes(bytes(raw))
    row = reduce.reduce(str(tmp_path), fmt=())["variance"].iloc[0]
    assert math.isnan(row["l2"]) and "damaged weights file(s) b" in row["note"]
    runs = store.read_runs(str(tmp_path)).to_pandas().set_index("run_id")
    assert runs.loc["b"].status == "failed" and "damaged weights file" in runs.loc["b"].error
    assert "b" not in store.ok_run_ids(str(tmp_path))  # so a resumed sweep runs it again


def test_a_damaged_run_file_is_named_and_counts_as_not_run(tmp_path: Path):
    """A flipped bit anywhere in a run file fails its read (page checksums for the values, the row's
    digest for the footer), never a changed value; the file is named in the warning and its run is
    not ok (a resume reruns it)."""
    write_run(tmp_path, "a", P0, weights())
    write_run(tmp_path, "b", P1, weights({(0, 0): 3.0}), replica=1)
    path = tmp_path / "runs" / "b.parquet"
    good, clean = path.read_bytes(), store.read_runs(str(tmp_path)).to_pandas().set_index("run_id").loc["b"]
    changed = []
    for i in range(4, len(good) - 8, 89):  # past the magic bytes, every 89th byte: data pages, footer, schema
        raw = bytearray(good)
        raw[i] ^= 0x10
        path.write_bytes(bytes(raw))
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            df = store.read_runs(str(tmp_path)).to_pandas().set_index("run_id")
        if "b" not in df.index:
            assert any("b.parquet" in str(w.message) for w in seen)
            continue
        row = df.loc["b"]
        for c in clean.index.drop(store.DIGEST):  # a flip in the digest's own name: unverified, values intact
            a, b = row[c], clean[c]
            same = np.array_equal(np.asarray(a), np.asarray(b)) if isinstance(b, np.ndarray) else a == b or (
                pd.isna(a) and pd.isna(b))
            if not same:
                changed.append((i, c, b, a))
    assert changed == []
    path.write_bytes(good)


def test_format_markdown_aligned():
    df = pd.DataFrame({"noise": ["algo", "control"], "n_runs": [10, 2], "acc_std": [0.0123456, math.nan]})
    lines = reduce.format_markdown(df).splitlines()
    assert lines[0] == "| noise   | n_runs | acc_std |"
    assert lines[1] == "|:--------|-------:|--------:|"
    assert lines[2] == "| algo    |     10 | 0.01235 |"
    assert lines[3] == "| control |      2 |     nan |"
    assert len({len(line) for line in lines}) == 1


def test_cli_usage_errors(tmp_path: Path, capsys):
    assert reduce.main([str(tmp_path / "nowhere")]) == 2
    write_run(tmp_path, "a", P0, weights())
    assert reduce.main([str(tmp_path), "--by", "arch,colour"]) == 2
    assert "colour" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        reduce.main([str(tmp_path), "--format", "xlsx"])
    assert e.value.code == 2
    assert reduce.main([str(tmp_path), "--format", "md", "--by", "arch,noise"]) == 0
    assert sorted(p.name for p in (tmp_path / "tables").iterdir()) == [
        "cross_stack.md", "divergence.md", "overhead.md", "overhead_ops.md", "sources.md", "subgroups.md",
        "variance.md"]


@pytest.mark.integration
@pytest.mark.filterwarnings("ignore:skipped 1")
def test_reduce_on_s3(tree: Path, monkeypatch):
    """The same tree on object storage (a local moto S3 server): read, weights copied to a temp
    folder for mmap, tables written back with single PUTs."""
    moto_server = pytest.importorskip("moto.server")
    import pyarrow.fs as pafs

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        for k, v in {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test",
                     "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}.items():
            monkeypatch.setenv(k, v)
        s3 = pafs.S3FileSystem(endpoint_override=f"http://{host}:{port}", allow_bucket_creation=True)
        s3.create_dir("bucket")
        fs, _ = store.resolve("s3://bucket/out")
        pafs.copy_files(str(tree), "bucket/out", source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=fs)
        tables = reduce.reduce("s3://bucket/out", fmt=("csv",))
        local = reduce.reduce(str(tree), fmt=())
        pd.testing.assert_frame_equal(tables["variance"], local["variance"])
        assert by_noise(tables["variance"], "algo")["l2"] == pytest.approx(4.0)
        assert store.exists(fs, "bucket/out/tables/variance.csv")
    finally:
        server.stop()


def test_precision_is_a_stack_axis(tmp_path: Path):
    if "precision" not in reduce.TOOLING:
        pytest.skip("the run schema has no precision column")
    write_run(tmp_path, "fp32", P0, weights())
    write_run(tmp_path, "bf16", P0, weights({(1, 1): 0.5}))
    fs, root = store.resolve(str(tmp_path))
    row = pq.read_table(store.run_path(root, "bf16")).to_pylist()[0] | {"precision": "bf16"}
    store.write_run(fs, root, row)
    tables = reduce.reduce(str(tmp_path), fmt=())
    assert sorted(tables["variance"]["precision"]) == ["bf16", "fp32"]
    x = tables["cross_stack"].iloc[0]
    assert (x["precision_a"], x["precision_b"], x["churn"], x["l2"]) == ("bf16", "fp32", 0.0, 0.5)


DESIGN_COLUMNS = [  # the run columns ../shared/DESIGN.md documents; everything added later is optional
    "run_id", "sweep", "arch", "dataset", "noise", "vary_init", "vary_order", "vary_augment", "vary_impl",
    "replica", "seed_init", "seed_order", "seed_augment", "accelerator_requested", "accelerator",
    "fingerprint_id", "hostname", "ray_node_id", "gpu_name", "gpu_count", "gpu_capability", "gpu_driver",
    "cuda_version", "cudnn_version", "torch_version", "torchvision_version", "ray_version", "python_version",
    "cpu_model", "num_threads", "status", "error", "epochs", "train_seconds", "epoch_seconds", "test_accuracy",
    "test_loss", "per_class_accuracy", "predictions", "weights_sha256", "weights_norm"]


def test_tree_with_only_the_documented_columns(tmp_path: Path):
    """Rows from an older writer or another tool: no spec_json, no tooling columns. The reducer
    gives its tables; a row it cannot use (no status) is counted in one warning line."""
    write_run(tmp_path, "a-0", P0, weights(), replica=0, seeds=(10, 20, 30))
    write_run(tmp_path, "a-1", P1, weights({(0, 0): 3.0}), replica=1, seeds=(11, 21, 31))
    write_run(tmp_path, "a-2", P2, weights({(1, 2): 4.0}), replica=2, seeds=(12, 22, 32))
    write_run(tmp_path, "a-3", P0, weights(), replica=3, seeds=(13, 23, 33))
    for path in (tmp_path / "runs").glob("*.parquet"):
        t = pq.read_table(path).select(DESIGN_COLUMNS)
        if path.stem == "a-3":
            t = t.set_column(t.schema.get_field_index("status"), "status", pa.array([None], pa.string()))
        pq.write_table(t, path)
    res = cli(str(tmp_path))
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    assert res.stderr.count("\n") == 1 and "1 run row(s) without" in res.stderr
    v = pd.read_parquet(tmp_path / "tables" / "variance.parquet")
    assert len(v) == 1 and v.iloc[0]["n_runs"] == 3 and v.iloc[0]["l2"] == pytest.approx(4.0)
    assert v.iloc[0]["workload"] == "" and v.iloc[0]["num_threads"] == 1


def write_probe(root: Path, probe_id: str, ratios: list[float], *, batch_norm: bool, drift: float = 0.0,
                steps: int = 3) -> None:
    """A probe file as probe.py writes it: per repeat r a det/nondet pair of blocks, alternating
    which goes first; nondet steps take 10 ms × (1 + drift·r), det steps ratios[r] times that."""
    spec = {"probe_id": probe_id, "workload": {"arch": "small_cnn", "dataset": "digits",
                                               "arch_args": {"batch_norm": batch_norm}, "replicas": 1}}
    rows = []
    for r, ratio in enumerate(ratios):
        nondet = 10.0 * (1 + drift * r)
        for i, mode in enumerate(("det", "nondet") if r % 2 == 0 else ("nondet", "det")):
            rows += [{"probe_id": probe_id, "arch": "small_cnn", "dataset": "digits", "accelerator_requested": "T4",
                      "accelerator": "Tesla T4", "fingerprint_id": "fp0", "mode": mode, "repeat": r,
                      "block": 2 * r + i, "step": s, "step_ms": nondet * (ratio if mode == "det" else 1.0),
                      "precision": "fp32", "channels_last": False, "compiled": False,
                      "spec_json": json.dumps(spec)} for s in range(steps)]
    (root / "overhead").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), root / "overhead" / f"{probe_id}.parquet")


def test_overhead_never_pools_workloads_of_one_arch(tmp_path: Path):
    """small_cnn with and without batch norm on one GPU: two rows, each its own overhead (the
    old table had one pooled row, the overhead of neither)."""
    write_probe(tmp_path, "bn", [2.0] * 4, batch_norm=True)
    write_probe(tmp_path, "plain", [1.2] * 4, batch_norm=False)
    table = reduce.overhead_table(*store.resolve(str(tmp_path)))
    assert len(table) == 2 and table["arch"].eq("small_cnn").all() and table["workload"].nunique() == 2
    assert sorted(table["overhead_pct"].round(9)) == [20.0, 100.0]
    assert table["n_pairs"].eq(4).all() and table["n_fingerprints"].eq(1).all()
    assert {"precision", "channels_last", "compiled"} <= set(table.columns)
    assert "cudnn_benchmark" not in table  # no probe recorded it


def test_overhead_interval_resamples_pairs(tmp_path: Path):
    """Every pair costs exactly +50% but the device slows down pair by pair (drift). Resampling
    pairs keeps each det block beside its own nondet block: the interval is [50, 50]. Resampling
    det and nondet blocks apart would mix slow and fast blocks into a wide interval."""
    write_probe(tmp_path, "p", [1.5] * 5, batch_norm=False, drift=0.5)
    o = reduce.overhead_table(*store.resolve(str(tmp_path))).iloc[0]
    assert (o["overhead_lo"], o["overhead_hi"], o["n_pairs"]) == pytest.approx((50.0, 50.0, 5))


def test_overhead_one_pair_has_no_interval(tmp_path: Path):
    """One det/nondet pair is one unit of evidence: no step-level interval from its steps."""
    write_probe(tmp_path, "p", [1.5], batch_norm=False, steps=20)
    o = reduce.overhead_table(*store.resolve(str(tmp_path))).iloc[0]
    assert o["overhead_pct"] == pytest.approx(50.0) and o["n_steps"] == 40
    assert math.isnan(o["overhead_lo"]) and math.isnan(o["overhead_hi"]) and "needs 2" in o["note"]


def test_overhead_of_old_two_mode_probes_has_no_parts(tmp_path: Path):
    """Files written before the probe timed the fill apart keep their total; parts are NaN, noted."""
    write_probe(tmp_path, "p", [1.5] * 3, batch_norm=False)
    o = reduce.overhead_table(*store.resolve(str(tmp_path))).iloc[0]
    assert o["overhead_pct"] == pytest.approx(50.0) and o["method"] == "probe"
    assert all(math.isnan(o[c]) for c in ("overhead_kernels_pct", "overhead_fill_lo", "step_ms_det_nofill"))
    assert "written before the parts" in o["note"]


def test_old_det_blocks_without_the_fill_count_as_the_kernels_part(tmp_path: Path):
    """An old probe under fill_uninitialized_memory: false ran `det` blocks without the fill (its
    impl_flags say so): they are det_nofill blocks, so the table gives the kernels part, no total."""
    write_probe(tmp_path, "p", [1.2] * 3, batch_norm=False)
    path = tmp_path / "overhead" / "p.parquet"
    df = pd.read_parquet(path)
    df["impl_flags"] = json.dumps({"fill_uninitialized_memory": False, "use_deterministic_algorithms": True})
    df.to_parquet(path)
    o = reduce.overhead_table(*store.resolve(str(tmp_path))).iloc[0]
    assert o["overhead_kernels_pct"] == pytest.approx(20.0) and math.isnan(o["overhead_pct"])
    assert "kernels part only" in o["note"]


def write_modes(root: Path, probe_id: str, factors: dict[str, float], repeats: int, drift: float = 0.0,
                steps: int = 3, compiled: bool = False) -> None:
    """A probe file of several modes: repeat r rotates the modes, nondet steps take 10 ms × (1 +
    drift·r) and every mode `factors[mode]` times that."""
    modes, rows = list(factors), []
    spec = {"probe_id": probe_id, "workload": {"arch": "resnet18", "dataset": "digits"}}
    for r in range(repeats):
        for i, mode in enumerate(modes[r % len(modes):] + modes[:r % len(modes)]):
            rows += [{"probe_id": probe_id, "arch": "resnet18", "dataset": "digits", "accelerator_requested": "any",
                      "accelerator": "cpu", "fingerprint_id": "fp0", "mode": mode, "repeat": r,
                      "block": len(modes) * r + i, "step": s, "step_ms": 10.0 * (1 + drift * r) * factors[mode],
                      "compiled": compiled, "spec_json": json.dumps(spec)} for s in range(steps)]
    (root / "overhead").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), root / "overhead" / f"{probe_id}.parquet")


def test_overhead_parts_add_up_and_their_intervals_pair_repeats(tmp_path: Path):
    """nondet 10 ms, deterministic kernels 12 ms, with the fill 15 ms, while the device slows down
    repeat by repeat: kernels +20%, fill +30% (both of the nondet step), total +50%, and every
    interval is exact because each repeat's blocks are resampled together."""
    write_modes(tmp_path, "p", {"det": 1.5, "det_nofill": 1.2, "nondet": 1.0}, repeats=4, drift=0.5)
    o = reduce.overhead_table(*store.resolve(str(tmp_path))).iloc[0]
    for part, value in (("overhead", 50.0), ("overhead_kernels", 20.0), ("overhead_fill", 30.0)):
        assert (o[f"{part}_pct"], o[f"{part}_lo"], o[f"{part}_hi"]) == pytest.approx((value,) * 3), part
    assert o["overhead_kernels_pct"] + o["overhead_fill_pct"] == pytest.approx(o["overhead_pct"], abs=1e-12)
    assert (o["n_pairs"], o["n_steps"], o["n_steps_det"]) == (4, 36, 12) and o["note"] == ""
    assert math.isnan(o["overhead_inductor_pct"])


def test_overhead_of_compiled_probes_isolates_inductors_deterministic_mode(tmp_path: Path):
    """det_noinductor 11 ms, det_nofill 12 ms: inductor's deterministic mode adds 10% of the nondet
    step, inside the kernels part (20%)."""
    write_modes(tmp_path, "p", {"det": 1.5, "det_nofill": 1.2, "det_noinductor": 1.1, "nondet": 1.0}, repeats=4,
                compiled=True)
    o = reduce.overhead_table(*store.resolve(str(tmp_path))).iloc[0]
    assert o["compiled"] and (o["overhead_inductor_pct"], o["overhead_kernels_pct"]) == pytest.approx((10.0, 20.0))
    assert o["overhead_inductor_lo"] == pytest.approx(10.0)


def test_incomplete_repeats_are_left_out_and_counted(tmp_path: Path):
    write_modes(tmp_path, "p", {"det": 1.5, "det_nofill": 1.2, "nondet": 1.0}, repeats=3)
    path = tmp_path / "overhead" / "p.parquet"
    df = pd.read_parquet(path)
    df[~((df["repeat"] == 2) & (df["mode"] == "det_nofill"))].to_parquet(path)  # a probe killed mid-repeat
    o = reduce.overhead_table(*store.resolve(str(tmp_path))).iloc[0]
    assert o["n_pairs"] == 2 and "1 incomplete repeat(s) left out" in o["note"]


def epoch_runs(root: Path, seconds: dict[str, list[float]], fingerprints: dict[str, str] | None = None,
               replicas: int = 3) -> None:
    """control and impl replicas of one workload with the same seeds per replica index."""
    for noise, epochs in seconds.items():
        for r in range(replicas):
            fp = (fingerprints or {}).get(noise, "fp0")
            write_run(root, f"{noise}-{r}", P0, weights(), noise=noise, replica=r, seeds=(r, r, r),
                      epoch_seconds=[e * (1 + 0.1 * r) for e in epochs], epochs=len(epochs), fingerprint_id=fp)


def replica_rows(root: Path) -> pd.DataFrame:
    table = reduce.reduce(str(root), fmt=())["overhead"]
    return table[table["method"] == "replicas"]


def test_replicas_give_an_overhead_from_paired_epoch_times(tmp_path: Path):
    """control (deterministic) epochs 1.5× impl's, replica by replica; the first epoch (warm-up,
    here 10× longer in control) is left out."""
    epoch_runs(tmp_path, {"control": [20.0, 3.0, 3.0], "impl": [2.0, 2.0, 2.0]})
    write_run(tmp_path, "algo-0", P1, weights({(0, 0): 1.0}), noise="algo")  # not a pair: no row of its own
    (o,) = replica_rows(tmp_path).to_dict("records")
    assert (o["overhead_pct"], o["overhead_lo"], o["overhead_hi"]) == pytest.approx((50.0, 50.0, 50.0))
    assert (o["arch"], o["dataset"], o["accelerator"], o["n_pairs"], o["n_epochs"]) == ("mlp", "toy", "cpu", 3, 12)
    assert (o["epoch_s_det"], o["epoch_s_nondet"]) == pytest.approx((3.3, 2.2))
    assert math.isnan(o["overhead_kernels_pct"]) and math.isnan(o["step_ms_det"])
    assert "epoch 1 (warm-up) left out" in o["note"] and "drift between them is not cancelled" in o["note"]


def test_replicas_on_different_fingerprints_are_refused_with_a_note(tmp_path: Path):
    epoch_runs(tmp_path, {"control": [3.0, 3.0], "impl": [2.0, 2.0]}, fingerprints={"impl": "fp1"})
    (o,) = replica_rows(tmp_path).to_dict("records")
    assert math.isnan(o["overhead_pct"]) and math.isnan(o["overhead_lo"]) and o["n_pairs"] == 0
    assert "refused: 3 of 3 control/impl pair(s) ran on different accelerators or fingerprints" in o["note"]
    assert "cpu fp0 vs cpu fp1" in o["note"]


def test_replicas_of_one_epoch_use_it_and_say_so(tmp_path: Path):
    epoch_runs(tmp_path, {"control": [3.0], "impl": [2.0]}, replicas=2)
    (o,) = replica_rows(tmp_path).to_dict("records")
    assert o["overhead_pct"] == pytest.approx(50.0) and "4 run(s) of one epoch" in o["note"]


def test_l2_counts_parameters_and_keeps_buffers_apart(tmp_path: Path):
    """BN running statistics are buffers, not parameters (the runner lists them in the file's
    metadata): w differs by 3 and running_mean by 4, so l2 is 3, not 5, and l2_buffers is 4."""
    meta = {"buffers": json.dumps(["bn.running_mean", "bn.running_var", "bn.num_batches_tracked"])}
    for run_id, dw, dm, seeds in (("a", 0.0, 0.0, (1, 2, 3)), ("b", 3.0, 4.0, (4, 5, 6))):
        tensors = weights({(0, 0): dw}) | {"bn.running_mean": np.array([dm, 0.0], dtype=np.float32),
                                           "bn.running_var": np.ones(2, dtype=np.float32),
                                           "bn.num_batches_tracked": np.array(9, dtype=np.int64)}
        write_run(tmp_path, run_id, P0, tensors, seeds=seeds)
        save_file(tensors, str(tmp_path / "weights" / f"{run_id}.safetensors"), metadata=meta)
    row = reduce.reduce(str(tmp_path), fmt=())["variance"].iloc[0]
    assert (row["l2"], row["l2_buffers"]) == pytest.approx((3.0, 4.0))


def test_l2_of_files_without_buffer_metadata_counts_every_float_tensor(tmp_path: Path):
    """Older trees: no metadata says which tensors are buffers, so all count as parameters and
    the buffers' distance is unknown."""
    write_run(tmp_path, "a", P0, weights() | {"bn.running_mean": np.zeros(2, dtype=np.float32)}, seeds=(1, 2, 3))
    write_run(tmp_path, "b", P0, weights({(0, 0): 3.0}) | {"bn.running_mean": np.full(2, 4.0, dtype=np.float32)},
              seeds=(4, 5, 6))
    row = reduce.reduce(str(tmp_path), fmt=())["variance"].iloc[0]
    assert row["l2"] == pytest.approx(math.sqrt(9 + 16 + 16)) and math.isnan(row["l2_buffers"])


def test_variance_p_pairs_by_replica_and_says_when_it_cannot():
    a = pd.Series([0.90, 0.92, 0.88, 0.91, 0.89], index=[0, 1, 2, 3, 4])
    b = pd.Series([0.97, 0.80, 0.95, 0.75, 0.82], index=[4, 1, 3, 2, 0])  # listed in another order
    p, test = reduce.variance_p(a, b)
    assert test == "paired Brown–Forsythe, 5 pairs"
    assert p == metrics.paired_scale_p(a.to_numpy(), b.sort_index().to_numpy())
    p, test = reduce.variance_p(a, b.drop([0, 1, 2]))  # 2 shared replicas: too few pairs
    assert math.isnan(p)  # 2 in b: no valid test, and the note says why
    assert test == "Brown–Forsythe, unpaired: 2 shared replicas; too few replicas (5 and 2; 5 a group needed)"
    pooled = pd.concat([a, a + 0.01])  # --by pooled two settings: replica indices repeat
    assert reduce.variance_p(pooled, b)[1] == "Brown–Forsythe, unpaired: replica indices repeat"


def test_a_large_group_takes_l2_from_a_seeded_sample_and_says_so(tmp_path: Path, monkeypatch):
    """Above L2_MAX_RUNS runs, l2 is the mean over the pairs of a fixed-seed subset: reproducible,
    near the all-pairs mean, and the note says how many runs it stands on."""
    for r in range(12):
        write_run(tmp_path, f"a-{r:02d}", P0, weights({(0, 0): float(r)}), replica=r, seeds=(r, r, r))
    exact = reduce.reduce(str(tmp_path), fmt=())["variance"].iloc[0]
    assert exact["l2"] == pytest.approx(np.mean([abs(i - j) for i in range(12) for j in range(i + 1, 12)]))
    monkeypatch.setattr(reduce, "L2_MAX_RUNS", 6)
    first, again = (reduce.reduce(str(tmp_path), fmt=())["variance"].iloc[0] for _ in range(2))
    assert first["l2"] == again["l2"] and first["l2"] != exact["l2"] and 1 < first["l2"] < 8
    assert "seeded sample of 6 of 12 runs" in first["note"] and first["identical_fraction"] == 0.0


@pytest.mark.filterwarnings("ignore:skipped 1")
def test_cross_stack_l2_reads_at_most_l2_max_runs_pairs_per_row(tree: Path, monkeypatch):
    """Every pair counts for churn and identity; the L2 distance, two weight files per pair, is the
    mean over a seeded subset of at most L2_MAX_RUNS pairs, and n_pairs_l2 says how many."""
    full = reduce.reduce(str(tree), fmt=())["cross_stack"].iloc[0]
    assert (full["n_pairs"], full["n_pairs_l2"], full["l2"]) == (3, 3, 1.0)
    monkeypatch.setattr(reduce, "L2_MAX_RUNS", 2)
    capped = reduce.reduce(str(tree), fmt=())["cross_stack"].iloc[0]
    assert (capped["n_pairs"], capped["n_pairs_l2"], capped["l2"], capped["churn"]) == (3, 2, 1.0, 1 / 8)


def test_l2_buffers_is_nan_for_a_model_without_float_buffers(tmp_path: Path):
    """A distance over no tensors is undefined: NaN, not 0 (it read 0 for models without buffers,
    and for every group whose runs were all bitwise equal). Equal runs of a model that has buffers
    are 0 apart, read from the one file's header."""
    for run_id, dw, seeds in (("a", 0.0, (1, 2, 3)), ("b", 3.0, (4, 5, 6))):
        write_run(tmp_path / "none", run_id, P0, weights({(0, 0): dw}), seeds=seeds)
        save_file(weights({(0, 0): dw}), str(tmp_path / "none" / "weights" / f"{run_id}.safetensors"),
                  metadata={"buffers": json.dumps(["steps"])})  # the int64 buffer only: no float buffer
    row = reduce.reduce(str(tmp_path / "none"), fmt=())["variance"].iloc[0]
    assert row["l2"] == pytest.approx(3.0) and math.isnan(row["l2_buffers"])
    bn = weights() | {"bn.running_mean": np.ones(2, dtype=np.float32)}
    for name, meta in (("equal", json.dumps(["bn.running_mean"])), ("equal-none", "[]")):
        for r in range(3):
            write_run(tmp_path / name, f"c-{r}", P0, bn, noise="control", replica=r)
            save_file(bn, str(tmp_path / name / "weights" / f"c-{r}.safetensors"), metadata={"buffers": meta})
    equal = reduce.reduce(str(tmp_path / "equal"), fmt=())["variance"].iloc[0]
    assert (equal["l2"], equal["l2_buffers"], equal["identical_fraction"]) == (0.0, 0.0, 1.0)
    equal_none = reduce.reduce(str(tmp_path / "equal-none"), fmt=())["variance"].iloc[0]
    assert equal_none["l2"] == 0.0 and math.isnan(equal_none["l2_buffers"])


@pytest.mark.filterwarnings("ignore:skipped 1")
def test_cross_stack_counts_the_pairs_its_churn_stands_on_and_signs_the_accuracy_difference(tree: Path):
    """churn is the mean over pairs with predictions on both sides: n_pairs_churn says how many
    (n_pairs counts every pair). acc_diff_mean is the mean |acc_a - acc_b|; acc_diff_signed_mean
    keeps the sign (side a, 1 thread, scores 1 and side b, 2 threads, 7/8 in every pair)."""
    write_run(tree, "c1-3", P0, weights(), noise="control", replica=3, seeds=(7, 7, 7))
    write_run(tree, "c2-3", P1, weights({(0, 0): 1.0}), noise="control", replica=3, num_threads=2, seeds=(7, 7, 7))
    fs, root = store.resolve(str(tree))
    unscored = store.read_runs(str(tree)).to_pandas().set_index("run_id").loc["c2-3"]
    store.write_run(fs, root, {"run_id": "c2-3", **{k: v for k, v in unscored.items()
                                                     if k != "predictions" and (np.ndim(v) or pd.notna(v))}})
    row = reduce.reduce(str(tree), fmt=())["cross_stack"].iloc[0]
    assert (row["n_pairs"], row["n_pairs_churn"], row["churn"]) == (4, 3, 1 / 8)
    assert row["acc_diff_mean"] == pytest.approx(1 / 8) and row["acc_diff_signed_mean"] == pytest.approx(1 / 8)


def test_whole_numbers_print_in_full():
    table = pd.DataFrame({"replicas_needed": [14427.0, math.inf, 2.0], "x": [0.1234567, 1e-5, 123456.5]})
    md = reduce.format_markdown(table)
    assert "14427" in md and "1.443e+04" not in md and "inf" in md and "0.1235" in md and "1.235e+05" in md
