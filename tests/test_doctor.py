"""`python -m orchestrator.doctor`: a real CPU run in a fresh process with Ray (and pandas) made
unimportable, as on a bare GPU box; the JSON must agree with the digests it recorded. Bits are never
asserted: on some CPUs 1 vs 2 threads change the weights, on others not."""

import json
import multiprocessing
import os
import subprocess
import sys
import textwrap
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch

from orchestrator import doctor
from tests.conftest import ROOT

BLOCKED = ("ray", "pandas")  # neither is on the GPU box the doctor is for
BLOCKER = textwrap.dedent(f"""
    import importlib.abc, importlib.machinery, sys

    class Blocker(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        # A spec without origin whose loading fails: `import ray` raises ModuleNotFoundError as if
        # ray were not installed, and torch._dynamo's find_spec scan of third-party libs skips it.
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {BLOCKED!r}:
                return importlib.machinery.ModuleSpec(name, self)

        def create_module(self, spec):
            raise ModuleNotFoundError(f"No module named {{spec.name!r}} (blocked by tests/test_doctor.py)",
                                      name=spec.name)

        def exec_module(self, module):
            pass

    sys.meta_path.insert(0, Blocker())
""")


def differ(digests: list[str]) -> bool:
    return len(set(digests)) > 1


@pytest.mark.integration
def test_cpu_doctor_runs_without_ray_and_reports_what_it_measured(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)  # every process, spawned workers included
    out = tmp_path / "d.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    proc = subprocess.run([sys.executable, "-m", "orchestrator.doctor", "--device", "cpu", "--minutes", "0.5",
                           "--json", str(out)], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    print(next(line for line in proc.stdout.splitlines() if line.startswith("wall time")))  # the doctor's wall time, for the log (not asserted: shared CPUs)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert {"fingerprint", "impl_differs", "control_identical", "threads_change_bits", "overhead",
            "verdicts"} <= report.keys()

    fp = report["fingerprint"]
    assert fp["accelerator"] == "cpu" and fp["ray_version"] is None  # Ray really was not importable
    assert fp["torch_version"] == torch.__version__ and len(fp["fingerprint_id"]) == 12

    reps = report["replicas"]
    assert len(reps["impl"]["weights_sha256"]) == 3 and len(reps["control"]["weights_sha256"]) == 2
    assert report["impl_differs"] is differ(reps["impl"]["weights_sha256"])
    assert report["control_identical"] is not differ(reps["control"]["weights_sha256"])
    assert report["threads_change_bits"] is differ(reps["threads"]["weights_sha256"])
    threads = reps["threads"]["num_threads"]  # as the runs recorded them
    assert threads[0] == 1 and threads[1] >= 2
    for group in reps.values():
        assert group["errors"] == [] and (group["max_abs_dw"] == 0) is not differ(group["weights_sha256"])
        assert 0 <= group["churn"] <= 1 and all(0 <= a <= 1 for a in group["test_accuracy"])
    assert report["cublas_workspace_before_cuda"] is None  # no CUDA, nothing to say

    assert [o["arch"] for o in report["overhead"]] == ["small_cnn", "resnet18"]
    for o in report["overhead"]:
        assert o["error"] is None and o["device"] == "cpu" and isinstance(o["nondeterministic_ops"], list)
        assert o["lo"] <= o["hi"] and o["step_ms_det"] > 0 and o["step_ms_nondet"] > 0 and o["step_ms_det_nofill"] > 0
        assert o["n_steps"] == 2 * 3 * 3  # --minutes 0.5 scales the 6 timed steps of a block to 2; 3 modes, 3 repeats
        assert o["kernels_lo"] <= o["kernels_hi"] and o["fill_lo"] <= o["fill_hi"] and o["inductor_pct"] is None
        assert o["kernels_pct"] + o["fill_pct"] == pytest.approx(o["overhead_pct"], abs=1e-9)
        assert len(o["top_ops"]) == doctor.TOP_OPS and any(t["op"].startswith("aten::") for t in o["top_ops"])
        assert [t["delta_ms"] for t in o["top_ops"]] == sorted((t["delta_ms"] for t in o["top_ops"]), reverse=True)
    assert "\n".join(doctor.top_ops(report["overhead"])) in proc.stdout

    lines = report["verdicts"]
    assert [line.split(":")[0] for line in lines] == ["device", "impl", "control", "threads",
                                                      "overhead small_cnn", "overhead resnet18"]
    assert ("DIFFER" in lines[1]) is report["impl_differs"] and ("CHANGE" in lines[3]) is report["threads_change_bits"]
    # where threads change bits, the doctor names the first op at which 1 and N threads part (diverge's trace)
    assert ("first_op" in reps["threads"]) is report["threads_change_bits"]
    if report["threads_change_bits"]:
        assert reps["threads"]["first_op"].startswith("part at op ") and "first differing op: part" in lines[3]
    assert "\n".join(lines) in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_requested_without_a_gpu_is_one_line_and_exit_2(capsys):
    assert doctor.main(["--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --device cuda:") and "--device cpu" in err


@pytest.mark.parametrize("argv, field", [(["--arch", "resnet18"], "--arch"),
                                         (["--probes", "sweeps/overhead_gpu.yaml", "--arch", "nope"], "--arch"),
                                         (["--probes", "sweeps/paper.yaml"], "--probes"),
                                         (["--probes", "missing.yaml"], "missing.yaml")])
def test_bad_options_name_the_field_and_exit_2_before_any_training(argv, field, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(doctor, "_worker", None)  # nothing may start: a worker would fail on None()
    assert doctor.main(["--device", "cpu", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and field in err


def test_minutes_must_be_positive(capsys):
    with pytest.raises(SystemExit) as e:
        doctor.parse_args(["--minutes", "0"])
    assert e.value.code == 2 and "--minutes" in capsys.readouterr().err


def test_probes_from_a_sweep_file_run_on_this_node_once_per_workload():
    probes = doctor.probe_specs("cpu", 2.0, str(ROOT / "sweeps/overhead_gpu.yaml"), ["small_cnn", "vgg16"])
    # overhead_gpu.yaml pins 3 accelerators and has small_cnn with and without batch norm
    assert [(p.workload.arch, p.workload.arch_args) for p in probes] == [
        ("small_cnn", {}), ("small_cnn", {"batch_norm": True}), ("vgg16", {})]
    assert {(p.accelerator, p.gpus, p.overhead.steps) for p in probes} == {("any", 0, 50)}


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_built_in_plan_is_the_same_seeds_in_every_replica_and_scales_steps(device):
    impl, control, threads = doctor.replica_specs(device, 4)
    assert (len(impl), len(control)) == (3, 2) and len({r.seeds for r in impl + control + threads}) == 1
    assert {r.gpus for r in impl + control} == {1 if device == "cuda" else 0} and {r.gpus for r in threads} == {0}
    assert [r.num_threads for r in threads] == [1, 4] and {r.num_threads for r in impl + control} == {1}
    short, long = (doctor.probe_specs(device, m, None, None) for m in (1.0, 4.0))
    assert [p.workload.arch for p in short] == ["small_cnn", "resnet18"]
    assert long[0].overhead.steps == 4 * short[0].overhead.steps


def test_max_abs_diff_is_the_largest_elementwise_gap_over_all_pairs():
    a = {"w": torch.zeros(3), "b": torch.ones(2), "n": torch.tensor(7)}
    b = {"w": torch.tensor([0.0, -0.25, 0.0]), "b": torch.ones(2), "n": torch.tensor(9)}
    c = {"w": torch.tensor([0.5, 0.0, 0.0]), "b": torch.ones(2), "n": torch.tensor(7)}
    assert doctor.max_abs_diff([a, a]) == 0.0
    assert doctor.max_abs_diff([a, b, c]) == 0.5  # w[0], c vs a; the int counter (7 vs 9) is not a weight


def test_verdicts_say_what_failed_instead_of_comparing():
    """A failed replica is recorded with its error; its group gets a verdict naming the error."""
    ok = {"errors": [], "identical": True, "max_abs_dw": 0.0, "churn": 0.0, "num_threads": [1, 2]}
    broken = {"errors": ["Diverged: diverged at epoch 1"], "identical": None, "max_abs_dw": None, "churn": None,
              "num_threads": [4, 4, 4]}
    probe_failed = {"label": "resnet18", "error": "RuntimeError: out of memory", "device": "cuda"}
    report = {"device": "cuda", "replicas": {"impl": broken, "control": ok, "threads": ok},
              "cublas_workspace_before_cuda": False, "overhead": [probe_failed]}
    assert doctor.verdicts(report) == [
        "impl: could not compare (Diverged: diverged at epoch 1)",
        "control: deterministic replicas are bitwise identical on cuda: seeds plus deterministic mode reproduce "
        "a run on this stack",
        "threads: 1 vs 2 intra-op threads give bitwise identical weights on this CPU (small_cnn)",
        "cuBLAS: CUDA had started before CUBLAS_WORKSPACE_CONFIG could be set (something starts CUDA at import): "
        "deterministic runs are not guaranteed on this node",
        "overhead resnet18: probe failed (RuntimeError: out of memory)"]


def probe_summary(device: str, total: float, kernels: tuple, fill: tuple) -> dict:
    return {"label": "resnet18", "device": device, "error": None, "nondeterministic_ops": [],
            "overhead_pct": total, "lo": total - 2, "hi": total + 2, "kernels_pct": kernels[0], "kernels_lo": kernels[1],
            "kernels_hi": kernels[2], "fill_pct": fill[0], "fill_lo": fill[1], "fill_hi": fill[2],
            "inductor_pct": None, "inductor_lo": None, "inductor_hi": None}


@pytest.mark.parametrize("o, fill_is_the_cost", [
    (probe_summary("cpu", 10.0, (0.3, -2.0, 2.5), (9.7, 7.0, 12.0)), True),  # issue #18: the CPU's +10%
    (probe_summary("cuda", 60.0, (50.0, 40.0, 60.0), (10.0, 8.0, 12.0)), False),  # the kernels cost most
    (probe_summary("cpu", 1.0, (0.3, -2.0, 2.5), (0.7, -1.0, 2.0)), False),  # no measurable fill
])
def test_the_overhead_verdict_gives_the_parts_and_says_when_the_cost_is_the_nan_fill(o, fill_is_the_cost):
    ok = {"errors": [], "identical": True, "max_abs_dw": 0.0, "churn": 0.0, "num_threads": [1, 2]}
    report = {"device": o["device"], "device_note": "", "replicas": dict.fromkeys(("impl", "control", "threads"), ok),
              "cublas_workspace_before_cuda": None, "overhead": [o]}
    line = doctor.verdicts(report)[-1]
    assert line.startswith(f"overhead resnet18: deterministic steps cost {o['overhead_pct']:+.1f}%")
    assert f"deterministic kernels {o['kernels_pct']:+.1f}% [{o['kernels_lo']:+.1f}%, {o['kernels_hi']:+.1f}%]" in line
    assert f"NaN fill {o['fill_pct']:+.1f}% [{o['fill_lo']:+.1f}%, {o['fill_hi']:+.1f}%]" in line
    assert ("most of the cost is torch's NaN fill" in line) is fill_is_the_cost
    assert ("fill_uninitialized_memory = False" in line) is fill_is_the_cost
    assert ("same kernels in every mode" in line) is (fill_is_the_cost and o["device"] == "cpu")


def test_a_worker_that_dies_is_an_error_line_and_exit_1(capsys, monkeypatch):
    """A worker killed outright (a segfault in a kernel, the OOM killer) must not end in a traceback."""
    def dying_worker():
        return ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=os._exit, initargs=(9,))

    monkeypatch.setattr(doctor, "_worker", dying_worker)
    assert doctor.main(["--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: a doctor worker process died")
