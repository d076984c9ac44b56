"""A real `ray job submit` of a small sweep against `ray start --head` on 127.0.0.1, token auth on.

Its own module: `ray start` binds fixed ports (dashboard agent 52365 among them) that another
live test cluster would hold."""

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator import store
from tests.conftest import ROOT, own_cluster, write_spec

pytestmark = [pytest.mark.integration, pytest.mark.ray]  # its own cluster
TINY = [{"arch": "mlp", "dataset": "digits", "epochs": 1, "batch_size": 128}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head_node(tmp_path_factory):
    """`ray start --head` on 127.0.0.1 with token auth on, HOME isolated so the token is ours.
    `ray start` turns auth on when a token exists, so one is generated first, as a user would.
    One for the module (its start and `ray stop` took 14 s a test); the suite's shared cluster is
    stopped first (its ports, and `ray stop --force` would kill it)."""
    own_cluster()
    tmp_path = tmp_path_factory.mktemp("head")
    ray_bin = str(Path(sys.executable).parent / "ray")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    env["HOME"] = str(tmp_path / "home")
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"  # as with the venv activated
    subprocess.run([ray_bin, "get-auth-token", "--generate"], env=env, check=True, capture_output=True, timeout=60)
    env["RAY_AUTH_MODE"] = "token"
    # the job agent on a free port: every local cluster's agent tries 52365, and one held there
    # (any other cluster on the host) left "No available agent to submit job" for minutes
    subprocess.run([ray_bin, "start", "--head", "--node-ip-address=127.0.0.1", "--num-cpus=2",
                    "--include-dashboard=true", "--dashboard-host=127.0.0.1", "--dashboard-port=8299",
                    f"--dashboard-agent-listen-port={free_port()}", "--disable-usage-stats"],
                   env=env, check=True, capture_output=True, timeout=120)
    try:
        yield ray_bin, env
    finally:
        subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_ray_job_submit_runs_a_sweep(head_node, tmp_path):
    ray_bin, env = head_node
    assert (Path(env["HOME"]) / ".ray" / "auth_token").read_text().strip()  # the token the client uses
    unauthenticated = subprocess.run([ray_bin, "job", "list", "--address", "http://127.0.0.1:8299"], capture_output=True,
                                     env={**env, "HOME": str(tmp_path), "RAY_AUTH_MODE": "disabled"}, timeout=120)
    assert unauthenticated.returncode != 0  # auth is really on: no token, no access
    spec = write_spec(tmp_path / "s.yaml", name="job", replicas=2, workloads=TINY)
    work = tmp_path / "src"  # the repo as a user would upload it: sources only
    shutil.copytree(ROOT, work, ignore=shutil.ignore_patterns(".venv", ".git", "results", "__pycache__", "*.egg-info", ".hypothesis", ".pytest_cache"))
    out = tmp_path / "out"
    address = ["--address", "http://127.0.0.1:8299"]
    submit = [ray_bin, "job", "submit", *address, "--submission-id", "sweep-1", "--working-dir", str(work),
              "--", "python", "-m", "orchestrator.sweep", str(spec), "--out", str(out)]
    deadline = time.time() + 180
    while True:  # the node's job agent comes up some seconds after `ray start` returns; Ray says "try again later"
        r = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=600)
        if "No available agent" not in r.stdout + r.stderr or time.time() > deadline:
            break
        time.sleep(2)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    status = subprocess.run([ray_bin, "job", "status", *address, "sweep-1"], env=env, capture_output=True,
                            text=True, timeout=120)
    assert "Job 'sweep-1' succeeded" in status.stdout  # the CLI's wording of status SUCCEEDED
    df = store.read_runs(str(out)).to_pandas()
    assert len(df) == 2 and (df.status == "ok").all()


def test_a_sweep_without_address_starts_its_own_cluster_beside_a_registered_one(head_node, tmp_path):
    """A `ray start --head` cluster registered on this host: a sweep given no address (and no
    RAY_ADDRESS) must neither run on it nor touch it; the cluster is still up and its own after."""
    ray_bin, env = head_node
    nodes = "import ray; ray.init(address='auto', logging_level='ERROR'); print(*[n['NodeID'] for n in ray.nodes()])"
    head_ids = subprocess.run([sys.executable, "-c", nodes], env=env, capture_output=True, text=True,
                              timeout=120).stdout.split()
    assert head_ids  # the registered cluster, found by discovery as a plain ray.init() would
    spec = write_spec(tmp_path / "s.yaml", name="mine", replicas=1, workloads=TINY)
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "orchestrator.sweep", str(spec), "--out", str(out)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    df = store.read_runs(str(out)).to_pandas()
    assert len(df) == 1 and df.ray_node_id.iloc[0] not in head_ids
    after = subprocess.run([sys.executable, "-c", nodes], env=env, capture_output=True, text=True, timeout=120)
    assert after.stdout.split() == head_ids  # still up, same node: the sweep stopped only its own cluster
