"""OUT on object storage: a real S3-compatible server (moto) on 127.0.0.1 holds runs, weights,
tables and Tune's own storage; endpoint and credentials come from the usual environment."""

import os
import subprocess
import sys

import pyarrow.fs as pafs
import pytest

from orchestrator import store, sweep
from tests.conftest import ROOT, own_cluster, write_spec

pytestmark = [pytest.mark.integration, pytest.mark.ray]  # its own cluster
SERVER = []  # the module's moto server and its port: the outage test stops and restarts it


@pytest.fixture(scope="module")
def s3_env():
    from moto.server import ThreadedMotoServer

    own_cluster()  # its workers must start with the variables below
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    SERVER[:] = [server, port]
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # before ray.init, so the workers inherit it too
    pafs.S3FileSystem(endpoint_override=f"{host}:{port}", scheme="http",
                      allow_bucket_creation=True).create_dir("sweeps-bucket")
    yield env
    own_cluster()  # the next module's workers start without them
    for k, v in saved.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    SERVER[0].stop()


@pytest.fixture(scope="module")
def s3_cluster(s3_env, ray_local):
    return s3_env


def test_sweep_and_reduce_on_s3(s3_cluster, tmp_path):
    out = "s3://sweeps-bucket/study/v1"
    spec = write_spec(tmp_path / "s.yaml", name="s3", replicas=2, noise=["control", "algo"],
                      workloads=[{"arch": "mlp", "dataset": "digits", "epochs": 1, "batch_size": 128}])
    assert sweep.main([str(spec), "--out", out]) == 0
    fs, root = store.resolve(out)

    def names(folder):
        return sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(f"{root}/{folder}")))
    assert len(names("runs")) == len(names("weights")) == 4
    assert {"variance.parquet", "variance.csv", "variance.md"} <= set(names("tables"))
    assert names("tune")  # Tune's experiment state lives beside the results
    df = store.read_runs(out).to_pandas()
    assert (df.status == "ok").all() and df[df.noise == "control"].weights_sha256.nunique() == 1

    assert sweep.main([str(spec), "--out", out]) == 0  # resume reads the listing from S3
    assert len(names("runs")) == 4

    r = subprocess.run([sys.executable, "-m", "orchestrator.reduce", out], cwd=ROOT, capture_output=True,
                       text=True, env={**os.environ, **s3_cluster}, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "control" in r.stdout and "algo" in r.stdout


def test_an_endpoint_that_dies_mid_sweep_fails_writes_not_the_sweep(s3_cluster, tmp_path, capsys):
    """The S3 server stops after the first rows land: the sweep goes on to its end, says in one line
    that storage failed (exit 4), leaves no half-written file; with the server back (moto keeps its
    objects in this process), the same command runs only what is missing, once."""
    import threading
    import time

    from moto.server import ThreadedMotoServer

    out = "s3://sweeps-bucket/outage"
    spec = write_spec(tmp_path / "s.yaml", name="outage", replicas=3, noise=["algo"], max_retries=0,
                      workloads=[{"arch": "mlp", "dataset": "digits", "epochs": 2, "batch_size": 64}])
    fs, root = store.resolve(out)
    code = []
    sweep_thread = threading.Thread(target=lambda: code.append(sweep.main([str(spec), "--out", out])))
    sweep_thread.start()
    deadline = time.time() + 300
    while time.time() < deadline and not code:
        if len(fs.get_file_info(pafs.FileSelector(f"{root}/runs", allow_not_found=True))) >= 1:
            break
        time.sleep(0.2)
    SERVER[0].stop()
    sweep_thread.join(timeout=600)
    assert code == [4]
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: storage failed")]
    assert len(lines) == 1 and "the same command resumes them" in lines[0]
    # the sweep's own output, not what Ray forwards from its workers ("(_trial pid=…) …", each line)
    assert not [line for line in err.splitlines() if "Traceback" in line and "pid=" not in line], err
    SERVER[0] = ThreadedMotoServer(ip_address="127.0.0.1", port=SERVER[1], verbose=False)
    SERVER[0].start()
    landed = {i.base_name for i in fs.get_file_info(pafs.FileSelector(f"{root}/runs"))}
    assert 1 <= len(landed) < 3 and not [n for n in landed if n.startswith(store.TMP_PREFIX)]
    assert sweep.main([str(spec), "--out", out]) == 0
    df = store.read_runs(out).to_pandas()
    assert len(df) == df.run_id.nunique() == 3 and (df.status == "ok").all()
