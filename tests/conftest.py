import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups from the markers
def pytest_collection_modifyitems(items):
    """Under `pytest -n 2 --dist loadgroup` (make test) every test that uses this process's Ray (the
    shared cluster, or a module's own marked `ray`) runs in one xdist worker, one after another as
    without xdist, and every other test in the other worker. A sweep's processes leave about a third
    of 2 cores idle (start-ups, waits), which the other worker's tests fill; two clusters at once
    would instead put four trial processes on two cores. Modules with a cluster of their own (marked
    `ray`) go first, so that the shared cluster starts once after them, not again after each."""
    items.sort(key=lambda item: not item.get_closest_marker("ray"))  # stable: modules stay whole, in order
    for item in items:
        if item.get_closest_marker("ray") or {"ray_local", "every_preset"} & set(item.fixturenames):
            item.add_marker(pytest.mark.xdist_group("ray"))


@pytest.fixture(autouse=True)
def _ray_tests_in_one_worker(request, tmp_path_factory):
    """Fails a Ray test that reaches a second xdist worker instead of letting it run: two clusters on
    2 cores, and one module's `ray stop --force` kills the other worker's cluster mid-test. The
    grouping silently stopped on pytest 9.2 (pytest-xdist#1386), hence the pin in pyproject.toml."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker and request.node.get_closest_marker("xdist_group"):
        runs = tmp_path_factory.getbasetemp().parent  # one folder for the whole xdist session
        (runs / f"ray-tests-{worker}").mkdir(exist_ok=True)
        others = sorted(p.name for p in runs.glob("ray-tests-*") if p.name != f"ray-tests-{worker}")
        assert not others, (f"Ray tests ran in {worker} and in {others}: xdist did not keep the "
                            "`ray` group in one worker (pytest-xdist#1386; pytest<9.2 in pyproject.toml)")


@pytest.fixture(scope="session")
def stacks_home(tmp_path_factory):
    """Where the suite's pip/uv stacks are built: one folder for the session (a user's persists in
    ~/.cache), shared by every test module and its workers."""
    home = tmp_path_factory.mktemp("stacks")
    os.environ["TOOLING_NOISE_STACKS"] = str(home)
    return home


def shared_cluster():
    """A real local Ray cluster, started by the first test that needs one and kept for the next:
    starting and stopping one cost about 7 s a module. A module that needs a cluster of its own
    (other nodes, other environment variables, `ray start`) calls `own_cluster()` first and is
    marked `ray` (its `pytestmark`), which keeps it in the Ray worker under `make test`'s -n 2."""
    import ray

    if not ray.is_initialized():
        # workers import tests.faulty (fault-injecting model builders) through PYTHONPATH
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING",
                 runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    return ray


@pytest.fixture(scope="module")
def ray_local(stacks_home):
    return shared_cluster()


@dataclass(frozen=True)
class Sweep:
    spec: Path
    out: Path
    nodes: frozenset[str]  # the Ray nodes of the cluster it ran on


@pytest.fixture(scope="session")
def every_preset(stacks_home, tmp_path_factory) -> Sweep:
    """One sweep of every noise preset, 3 replicas of small_cnn on digits (2 epochs, crop), read by
    test_sweep (the presets behave as the study says) and test_sources (the sources table of a
    real sweep): one sweep instead of two saves its two pools' process start-ups (~20 s)."""
    from orchestrator import sweep

    ray = shared_cluster()
    tmp = tmp_path_factory.mktemp("presets")
    spec = write_spec(tmp / "s.yaml", name="presets", replicas=3,
                      noise=["control", "algo", "impl", "algo+impl", "init", "order", "augment", "bitflip"],
                      workloads=[{"arch": "small_cnn", "dataset": "digits", "epochs": 2, "batch_size": 64,
                                  "lr": 0.002, "optimizer": "adam", "augmentation": "crop"}])
    assert sweep.main([str(spec), "--out", str(tmp / "out")]) == 0
    return Sweep(spec, tmp / "out", frozenset(n["NodeID"] for n in ray.nodes()))


def own_cluster() -> None:
    """Stop the shared cluster (the next module that needs one starts it again). Only from a module
    marked `ray`: unmarked, under -n 2 it would run in the other xdist worker, beside the cluster."""
    if "ray" in sys.modules:
        sys.modules["ray"].shutdown()


@pytest.fixture(scope="session", autouse=True)
def _stop_the_shared_cluster():
    yield
    own_cluster()


def write_spec(path: Path, **fields) -> Path:
    """A sweep YAML with small, fast defaults (digits, small_cnn, 2 epochs) overridden by fields."""
    doc = {"name": "t", "base_seed": 0, "replicas": 2, "noise": ["control"],
           "workloads": [{"arch": "small_cnn", "dataset": "digits", "epochs": 2, "batch_size": 64,
                          "lr": 0.002, "optimizer": "adam"}]}
    doc.update(fields)
    path.write_text(yaml.safe_dump(doc))
    return path


def cli(*args: str, env: dict | None = None, timeout: float = 600):
    """Run `python -m orchestrator.sweep ...` as a user would, in a fresh process."""
    import subprocess

    return subprocess.run([sys.executable, "-m", "orchestrator.sweep", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout, env={**os.environ, **(env or {})})


@pytest.fixture
def torch_switches():
    """Put back the process-wide switches that an in-process `runner.run` sets (threads,
    deterministic kernels), so later tests in the same process see torch's defaults."""
    import torch

    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(det)
