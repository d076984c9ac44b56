import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def stacks_home(tmp_path_factory):
    """Where the suite's pip/uv stacks are built: one folder for the session (a user's persists in
    ~/.cache), shared by every test module and its workers."""
    import os

    home = tmp_path_factory.mktemp("stacks")
    os.environ["TOOLING_NOISE_STACKS"] = str(home)
    return home


def shared_cluster():
    """A real local Ray cluster, started by the first test that needs one and kept for the next:
    starting and stopping one cost about 7 s a module. A module that needs a cluster of its own
    (other nodes, other environment variables, `ray start`) calls `own_cluster()` first."""
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
    """Stop the shared cluster (the next module that needs one starts it again)."""
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
    import os
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
