"""OUT on object storage: a real S3-compatible server (moto) on 127.0.0.1 holds runs, weights,
tables and Tune's own storage; endpoint and credentials come from the usual environment."""

import os
import subprocess
import sys

import pyarrow.fs as pafs
import pytest

from orchestrator import store, sweep
from tests.conftest import ROOT, write_spec

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def s3_env():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # before ray.init, so the workers inherit it too
    pafs.S3FileSystem(endpoint_override=f"{host}:{port}", scheme="http",
                      allow_bucket_creation=True).create_dir("sweeps-bucket")
    yield env
    for k, v in saved.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    server.stop()


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
