"""Heterogeneous clusters: accelerator pinning on a simulated 4-node cluster and the pre-flight
error (the `ray job submit` test is in test_job_submit.py, away from this module's cluster)."""

import json
import time

import pytest

from orchestrator import store, sweep
from tests.conftest import own_cluster, write_spec

pytestmark = [pytest.mark.integration, pytest.mark.ray]  # its own cluster
ACCELERATORS = ("T4", "V100", "A100")
TINY = [{"arch": "mlp", "dataset": "digits", "epochs": 1, "batch_size": 128}]


@pytest.fixture(scope="module")
def hetero():
    """A head (no GPU) and three workers advertising T4, V100 and A100 with one logical GPU each."""
    import ray
    from ray.cluster_utils import Cluster

    own_cluster()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    for acc in ACCELERATORS:
        cluster.add_node(num_cpus=1, num_gpus=1, resources={f"accelerator_type:{acc}": 1})
    ray.init(address=cluster.address, logging_level="WARNING")
    cluster.wait_for_nodes()
    node_of = {k.split(":", 1)[1]: n["NodeID"] for n in ray.nodes() for k in n["Resources"]
               if k.startswith("accelerator_type:")}
    yield node_of
    ray.shutdown()
    cluster.shutdown()


def test_every_run_lands_on_a_node_with_its_accelerator(hetero, tmp_path):
    spec = write_spec(tmp_path / "s.yaml", name="pin", replicas=2, accelerators=list(ACCELERATORS),
                      resources={"cpus": 1, "gpus": 0.5}, workloads=TINY)
    assert sweep.main([str(spec), "--out", str(tmp_path / "out")]) == 0
    df = store.read_runs(str(tmp_path / "out")).to_pandas()
    assert len(df) == 6
    for r in df.itertuples():
        assert r.ray_node_id == hetero[r.accelerator_requested], r.run_id
        # a logical GPU that torch cannot see: the run fell back to the CPU and says so
        assert r.accelerator == "cpu" and r.gpu_count == 0
        assert "CUDA_VISIBLE_DEVICES" in json.loads(r.env)


def test_preflight_names_the_missing_type_fast(hetero, tmp_path, capsys):
    spec = write_spec(tmp_path / "s.yaml", name="h100", accelerators=["H100"], resources={"gpus": 1},
                      workloads=TINY)
    t0 = time.perf_counter()
    assert sweep.main([str(spec), "--out", str(tmp_path / "out")]) == 2
    assert time.perf_counter() - t0 < 10
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "H100" in err[0] and "A100, T4, V100" in err[0]
