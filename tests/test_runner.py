"""One replica in-process, as a worker runs it: a CPU run never touches CUDA, the weights file
tells buffers from parameters, the global RNG and the augment generator are distinct streams, cuDNN
autotuning is its own tooling axis, and the fingerprint says what it knows and what it lacks."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from orchestrator import fingerprint, runner, spec, store

CPU = torch.device("cpu")
SYNTHETIC = {"dataset": "synthetic", "epochs": 1, "batch_size": 32, "lr": 0.01,
             "dataset_args": {"n_train": 64, "n_test": 16, "image_size": 8}}


def expand(arch: str, noise=("control",), replicas: int = 1, arch_args=None, **fields) -> list[spec.RunSpec]:
    w = {"arch": arch, **SYNTHETIC} | ({"arch_args": arch_args} if arch_args else {})
    return spec.expand(spec.parse({"name": "runner", "replicas": replicas, "noise": list(noise),
                                   "workloads": [w], **fields}))


# --- the device the run used ------------------------------------------------------------------

CUDA_ENTRY_POINTS = ("is_available", "device_count", "current_device", "get_device_properties", "init",
                     "_lazy_init", "current_blas_handle", "synchronize")


@pytest.fixture
def cuda_forbidden(monkeypatch):
    """Every torch.cuda call that would query or start CUDA raises, as if it were forbidden."""
    def refuse(*_, **__):
        raise AssertionError("a CPU run called into torch.cuda")

    for name in CUDA_ENTRY_POINTS:
        monkeypatch.setattr(torch.cuda, name, refuse)


def test_fingerprint_of_a_cpu_run_never_calls_into_cuda(cuda_forbidden):
    fp = fingerprint.collect(CPU)
    assert fp["accelerator"] == "cpu" and fp["gpu_name"] is None and fp["gpu_count"] == 0
    assert fp.get("cublas_version") is None and fp.get("tf32_settings") is None
    assert fp["fingerprint_complete"] is True and fp["fingerprint_missing"] == ""


def test_a_cpu_run_leaves_cuda_uninitialised(tmp_path, cuda_forbidden):
    (run,) = expand("small_cnn")
    row = runner.run(run, str(tmp_path))
    assert row["status"] == "ok", row.get("error")
    assert row["accelerator"] == "cpu" and not torch.cuda.is_initialized()


# --- weights file -----------------------------------------------------------------------------

def test_weights_norm_is_over_parameters_and_the_file_names_the_buffers(tmp_path):
    (run,) = expand("small_cnn", arch_args={"batch_norm": True})
    row = runner.run(run, str(tmp_path))
    assert row["status"] == "ok", row.get("error")
    path = store.weights_path(str(tmp_path), run.run_id)
    with safe_open(path, "pt") as f:
        buffers = json.loads(f.metadata()["buffers"])
    tensors = load_file(path)
    assert buffers == sorted(f"0.{i}.{b}" for i in (1, 5, 9) for b in ("num_batches_tracked", "running_mean",
                                                                        "running_var"))
    params = sum(float(t.double().pow(2).sum()) for n, t in tensors.items() if n not in buffers)
    everything = sum(float(t.double().pow(2).sum()) for t in tensors.values() if t.is_floating_point())
    assert row["weights_norm"] == pytest.approx(params ** 0.5, rel=1e-12)
    assert row["weights_norm"] < everything ** 0.5  # running variances are ~1 each: not in the norm
    assert row["weights_sha256"] == runner.weights_digest(tensors)[0]  # the digest still covers buffers


def test_tied_parameters_are_not_buffers():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 3))
    model[2].weight = model[0].weight
    assert runner.buffer_names(model) == {"1.running_mean", "1.running_var", "1.num_batches_tracked"}


# --- streams ----------------------------------------------------------------------------------

def test_dropout_stream_is_apart_from_the_augment_generator_yet_follows_augment(tmp_path):
    runs = expand("tests.instrumented:global_rng_recorder", noise=("control", "augment"), replicas=2)
    draws = {}
    for run in runs:
        row = runner.run(run, str(tmp_path))
        assert row["status"] == "ok", row.get("error")
        draws[run.noise, run.replica] = load_file(store.weights_path(str(tmp_path), run.run_id))["first_draw"]
        augment_stream = torch.rand(16, generator=torch.Generator().manual_seed(run.seeds.augment))
        assert not torch.equal(draws[run.noise, run.replica], augment_stream)
        assert torch.equal(draws[run.noise, run.replica],
                           torch.rand(16, generator=torch.Generator().manual_seed(run.seeds.global_rng)))
    assert torch.equal(draws["control", 0], draws["control", 1])  # fixed with the augment source
    assert not torch.equal(draws["augment", 0], draws["augment", 1])  # and varied with it


# --- cuDNN autotuning as a tooling axis -------------------------------------------------------

def test_cudnn_benchmark_is_a_tooling_axis_recorded_in_the_row(tmp_path):
    runs = expand("mlp", noise=("control", "impl"), tooling={"cudnn_benchmark": [False, True]})
    assert len(runs) == 4 and len({r.run_id for r in runs}) == 4
    for run in runs:
        row = runner.run(run, str(tmp_path))
        flags = json.loads(row["impl_flags"])
        assert row["status"] == "ok" and row["cudnn_benchmark"] is run.cudnn_benchmark
        assert flags["cudnn_benchmark"] is run.cudnn_benchmark
        assert flags["use_deterministic_algorithms"] is (run.noise == "control")
    df = store.read_runs(str(tmp_path)).to_pandas()
    assert sorted(zip(df.noise, df.cudnn_benchmark)) == [("control", False), ("control", True),
                                                         ("impl", False), ("impl", True)]


def test_cudnn_benchmark_at_its_default_keeps_run_ids():
    plain = expand("mlp")[0]
    assert expand("mlp", tooling={"cudnn_benchmark": [False]})[0].run_id == plain.run_id
    on = expand("mlp", tooling={"cudnn_benchmark": [True]})[0]
    assert on.run_id != plain.run_id and on.cudnn_benchmark


# --- fingerprint ------------------------------------------------------------------------------

def test_missing_parts_name_what_a_gpu_run_could_not_read():
    gpu = {"torch_version": "2", "torchvision_version": "0", "cpu_model": "x", "gpu_name": "NVIDIA H100",
           "gpu_driver": "580.1", "cuda_version": "13.0", "cudnn_version": "92400", "cublas_version": "13.1.1"}
    assert fingerprint.missing_parts(gpu, "cuda", compiled=False) == []
    assert fingerprint.missing_parts(gpu | {"gpu_driver": None}, "cuda", False) == ["gpu_driver"]  # NVML failed
    assert fingerprint.missing_parts(gpu, "cuda", compiled=True) == ["triton_version"]
    assert fingerprint.missing_parts({"torch_version": "2", "torchvision_version": "0", "cpu_model": ""},
                                     "cpu", True) == ["cpu_model"]


def test_fingerprint_id_hashes_new_stack_parts_only_when_set():
    cpu = {"torch_version": "2", "torchvision_version": "0", "cpu_model": "x", "cuda_version": "13.0"}
    same = cpu | {"cublas_version": None, "triton_version": None, "tf32_override": None}
    assert fingerprint.fingerprint_id(same) == fingerprint.fingerprint_id(cpu)  # older rows keep their id
    ids = {fingerprint.fingerprint_id(cpu | {k: v}) for k, v in
           (("cublas_version", "13.1.1"), ("cublas_version", "13.0.0"), ("triton_version", "3.8.0"),
            ("tf32_override", "0"), ("tf32_override", "1"))}
    assert len(ids) == 5 and fingerprint.fingerprint_id(cpu) not in ids


def test_loaded_library_finds_a_library_this_process_mapped():
    path = fingerprint.loaded_library("libtorch_cpu.so")
    assert path is not None and path.endswith(".so") and "libtorch_cpu" in path
    assert fingerprint.loaded_library("libsurely_not_loaded_here.so") is None


def test_cublas_version_is_read_from_the_library_itself():
    """cublasGetProperty needs no GPU: read it from the cuBLAS that the CUDA build of torch ships."""
    from importlib.metadata import distributions

    libs = [(d, f) for d in distributions() if (d.metadata["Name"] or "").startswith("nvidia-cublas")
            for f in d.files or [] if f.name.startswith("libcublas.so")]
    if not libs:
        pytest.skip("no cuBLAS wheel installed (CPU-only torch)")
    wheel, lib = libs[0]
    got = fingerprint.cublas_version(str(lib.locate()))
    assert got is not None and f"{wheel.version}.".startswith(f"{got}.")  # 13.1.1 of wheel 13.1.1.3
    assert fingerprint.cublas_version("/nonexistent/libcublas.so") is None


def test_compiled_runs_record_triton_version_and_tf32_override_is_hashed(monkeypatch):
    from importlib.metadata import PackageNotFoundError, version

    try:
        triton = version("triton")
    except PackageNotFoundError:
        triton = None
    plain = fingerprint.collect(CPU)
    assert plain["triton_version"] is None and plain["tf32_override"] is None
    assert fingerprint.collect(CPU, compiled=True)["triton_version"] == triton
    monkeypatch.setenv("NVIDIA_TF32_OVERRIDE", "0")
    fp = fingerprint.collect(CPU)
    assert fp["tf32_override"] == "0" and json.loads(fp["env"])["NVIDIA_TF32_OVERRIDE"] == "0"
    assert fp["fingerprint_id"] != plain["fingerprint_id"]


def test_a_run_that_cannot_write_tries_its_log_once(tmp_path, monkeypatch, torch_switches):
    """OUT's storage down: the write that failed the run had its tries and backoff; the log, a copy
    of the traceback the row holds, is then tried once (three more tries held the slot ~4 s longer)."""
    def down(*_):
        raise OSError("storage is down")

    slept = []
    monkeypatch.setattr(store.time, "sleep", slept.append)
    monkeypatch.setattr(store, "_write_once", down)
    with pytest.raises(OSError, match="storage is down"):
        runner.run(expand("mlp")[0], str(tmp_path))
    assert slept == [0.5 * 2**i for i in range(store.WRITE_TRIES - 1)]  # one write's backoff, none for the log
