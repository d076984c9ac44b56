"""The cluster files are checked the way Ray itself reads them, without touching a cloud.

- aws.yaml and gcp.yaml go through the steps `ray up` runs before it calls the cloud: Ray's
  `prepare_config` (defaults merged), for AWS Ray's resource auto-detection fed with the region's
  instance types from the EC2 snapshot moto ships, then Ray's `validate_config` (the jsonschema in
  ray/autoscaler/ray-schema.json plus Ray's own cross-field checks).
- kuberay.yaml goes through the function Ray's KubeRay autoscaler uses to turn a RayCluster into an
  autoscaling config, so the `accelerator_type:<T>` strings are parsed exactly as in production.
- Every accelerator named by a sweeps/*.yaml must be offered by a worker type of every cluster file:
  a run pinned to a type that no node offers stays PENDING forever.
"""

from __future__ import annotations

import copy
import functools
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
SWEEPS = sorted((ROOT / "sweeps").glob("*.yaml"))
ACCELERATORS = {"T4", "V100", "A100", "L4", "H100"}  # every cluster file offers all of these

# GCP: what each machine type really carries, to check the hand-written `resources` against.
GCE_GPU_TYPES = {"nvidia-tesla-t4": "T4", "nvidia-tesla-v100": "V100", "nvidia-tesla-a100": "A100",
                 "nvidia-l4": "L4", "nvidia-h100-80gb": "H100"}
GCE_GPU_MACHINES = {"a2-highgpu-1g": ("A100", 1, 12), "g2-standard-8": ("L4", 1, 8),
                    "a3-highgpu-8g": ("H100", 8, 208)}  # machine type: (accelerator, GPUs, vCPUs)
# GKE node label `cloud.google.com/gke-accelerator` -> Ray accelerator type.
GKE_ACCELERATOR_LABELS = {"nvidia-tesla-t4": "T4", "nvidia-tesla-v100": "V100",
                          "nvidia-tesla-a100": "A100", "nvidia-l4": "L4", "nvidia-h100-80gb": "H100"}


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def accelerator_types(resources: dict) -> set[str]:
    return {k.removeprefix("accelerator_type:") for k in resources if k.startswith("accelerator_type:")}


def offered(node_types: dict) -> set[str]:
    return set().union(*(accelerator_types(t["resources"]) for t in node_types.values()))


def launcher_checked(raw: dict) -> dict:
    """What `ray up` does to a config before it talks to the cloud: merge defaults, validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)
    return config


@functools.lru_cache
def ec2_catalogue(region: str) -> list[dict]:
    """EC2's instance types offered in `region`, as `describe_instance_types` returns them, from the
    snapshot of EC2 that moto ships (no network, no credentials)."""
    import gzip
    import json
    from importlib.resources import files

    data = files("moto.ec2") / "resources"
    with (data / "instance_types.json.gz").open("rb") as f:
        types = json.load(gzip.open(f))
    with (data / "instance_type_offerings" / "region" / f"{region}.json.gz").open("rb") as f:
        in_region = {o["InstanceType"] for o in json.load(gzip.open(f))}
    return [types[t] for t in sorted(in_region) if t in types]


@pytest.fixture(scope="module")
def aws() -> dict:
    """aws.yaml after Ray's own AWS resource auto-detection (what `ray up` adds from the EC2 API)."""
    from ray.autoscaler._private.aws import node_provider
    from ray.autoscaler._private.util import validate_config

    config = launcher_checked(load("aws.yaml"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(node_provider, "list_ec2_instances", lambda region, credentials=None: ec2_catalogue(region))
        filled = node_provider.AWSNodeProvider.fillout_available_node_types_resources(config)
    validate_config(filled)
    return filled


@pytest.fixture(scope="module")
def gcp() -> dict:
    return launcher_checked(load("gcp.yaml"))


@pytest.fixture(scope="module")
def kuberay_raw() -> dict:
    return load("kuberay.yaml")


@pytest.fixture(scope="module")
def kuberay(kuberay_raw) -> dict:
    """The autoscaling config Ray's KubeRay autoscaler derives from the RayCluster (validated inside)."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    cr = copy.deepcopy(kuberay_raw)
    cr["metadata"].setdefault("namespace", "default")  # the operator fills it in on the live object
    return _derive_autoscaling_config_from_ray_cr(cr)


# --- the validator itself -------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_ray_validator_rejects_a_broken_copy(name):
    """Guards the guard: a misspelt key in a node type must fail the same check the files pass."""
    raw = load(name)
    raw["available_node_types"]["head"]["min_worker"] = 0
    with pytest.raises(jsonschema.ValidationError):
        launcher_checked(raw)


@pytest.mark.parametrize("name, command", [("aws.yaml", "ray up cluster/aws.yaml"),
                                           ("gcp.yaml", "ray up cluster/gcp.yaml"),
                                           ("kuberay.yaml", "kubectl apply -f cluster/kuberay.yaml")])
def test_each_file_opens_with_its_launch_command(name, command):
    head = (CLUSTER / name).read_text().split("\n\n")[0]
    assert head.startswith("# Launch") and command in head


# --- AWS ------------------------------------------------------------------------------------------

def test_aws_instance_types_exist_in_the_region():
    """One unknown instance type makes `ray up` skip resource detection for every type."""
    raw = load("aws.yaml")
    catalogue = {t["InstanceType"] for t in ec2_catalogue(raw["provider"]["region"])}
    for name, node_type in raw["available_node_types"].items():
        assert node_type["node_config"]["InstanceType"] in catalogue, name


def test_aws_head_never_runs_trials(aws):
    head = aws["available_node_types"][aws["head_node_type"]]["resources"]
    assert head["CPU"] == 0 and not head.get("GPU") and not accelerator_types(head)


def test_aws_worker_types_are_detected_not_hand_written(aws):
    """AWS fills CPU/GPU/accelerator_type per instance type; hand-written values would only add typos."""
    raw = load("aws.yaml")
    for name, node_type in raw["available_node_types"].items():
        if name != raw["head_node_type"]:
            assert node_type["resources"] == {}, name
    for name, node_type in aws["available_node_types"].items():
        if name == aws["head_node_type"]:
            continue
        res = node_type["resources"]
        assert res["GPU"] >= 1 and len(accelerator_types(res)) == 1, (name, res)
        assert node_type["min_workers"] == 0, name
        assert node_type["max_workers"] <= aws["max_workers"], name


def test_aws_offers_every_accelerator(aws):
    assert offered(aws["available_node_types"]) == ACCELERATORS


# --- GCP ------------------------------------------------------------------------------------------

def test_gcp_head_never_runs_trials(gcp):
    head = gcp["available_node_types"][gcp["head_node_type"]]["resources"]
    assert head["CPU"] == 0 and not head.get("GPU") and not accelerator_types(head)


def test_gcp_resources_match_the_hardware(gcp):
    """GCP does not detect resources: the hand-written CPU, GPU and accelerator_type must be true."""
    for name, node_type in gcp["available_node_types"].items():
        if name == gcp["head_node_type"]:
            continue
        res, cfg = node_type["resources"], node_type["node_config"]
        machine = cfg["machineType"]
        if machine in GCE_GPU_MACHINES:
            acc, gpus, cpus = GCE_GPU_MACHINES[machine]
            assert "guestAccelerators" not in cfg, name  # A2/G2/A3 come with their GPUs
        else:
            (attached,) = cfg["guestAccelerators"]
            acc, gpus = GCE_GPU_TYPES[attached["acceleratorType"]], attached["acceleratorCount"]
            cpus = int(re.fullmatch(r"n1-(?:standard|highmem)-(\d+)", machine).group(1))
        assert accelerator_types(res) == {acc}, name
        assert res[f"accelerator_type:{acc}"] == 1, name
        assert (res["GPU"], res["CPU"]) == (gpus, cpus), name
        assert cfg["scheduling"]["onHostMaintenance"] == "TERMINATE", name  # GPU VMs cannot migrate
        assert node_type["min_workers"] == 0, name


def test_gcp_workers_run_as_the_project_service_account(gcp):
    project = gcp["provider"]["project_id"]
    for name, node_type in gcp["available_node_types"].items():
        if name != gcp["head_node_type"]:
            (sa,) = node_type["node_config"]["serviceAccounts"]
            assert sa["email"] == f"ray-autoscaler-sa-v1@{project}.iam.gserviceaccount.com", name


def test_gcp_offers_every_accelerator(gcp):
    assert offered(gcp["available_node_types"]) == ACCELERATORS


# --- both launcher files --------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_token_auth_stays_on(name):
    """Every node gets the laptop's token and starts Ray with RAY_AUTH_MODE=token."""
    raw = load(name)
    assert raw["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = next(c for c in raw[key] if "ray start" in c)
        assert "export RAY_AUTH_MODE=token;" in start, key
        assert "dashboard-host" not in start, key  # the dashboard stays on 127.0.0.1 (ssh tunnel only)
    assert "RAY_AUTH_MODE=disabled" not in (CLUSTER / name).read_text()


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_nodes_install_this_repository_and_torch(name):
    raw = load(name)
    assert raw["file_mounts"]["~/tooling-noise"] == "."
    setup = " && ".join(raw["setup_commands"])
    assert "pip install -q --no-cache-dir -e ~/tooling-noise" in setup
    assert re.search(r"pip install .*torch==\S+ torchvision==\S+", setup)
    assert raw["docker"]["image"].startswith("rayproject/ray:2.60.0-py311")
    assert {".venv", ".git", "results", "data"} <= set(raw["rsync_exclude"])


# --- KubeRay --------------------------------------------------------------------------------------

def test_kuberay_is_a_token_authenticated_raycluster(kuberay_raw):
    assert kuberay_raw["apiVersion"] == "ray.io/v1" and kuberay_raw["kind"] == "RayCluster"
    assert kuberay_raw["spec"]["authOptions"] == {"mode": "token"}
    assert kuberay_raw["spec"]["enableInTreeAutoscaling"] is True


def test_kuberay_head_never_runs_trials(kuberay, kuberay_raw):
    head = kuberay["available_node_types"][kuberay["head_node_type"]]["resources"]
    assert head["CPU"] == 0 and "GPU" not in head and not accelerator_types(head)
    limits = kuberay_raw["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert "nvidia.com/gpu" not in limits


def test_kuberay_one_worker_group_per_accelerator(kuberay, kuberay_raw):
    groups = kuberay_raw["spec"]["workerGroupSpecs"]
    seen = []
    for group in groups:
        name = group["groupName"]
        res = kuberay["available_node_types"][name]["resources"]
        (acc,) = accelerator_types(res)
        pod = group["template"]["spec"]
        container = pod["containers"][0]
        gpus = container["resources"]["limits"]["nvidia.com/gpu"]
        assert res["GPU"] == gpus >= 1, name
        assert GKE_ACCELERATOR_LABELS[pod["nodeSelector"]["cloud.google.com/gke-accelerator"]] == acc, name
        assert "pip install" in " ".join(container["command"]), name
        assert group["minReplicas"] == 0, name
        seen.append(acc)
    assert sorted(seen) == sorted(ACCELERATORS)  # exactly one group each


# --- sweeps against clusters ----------------------------------------------------------------------

def sweep_accelerators(path: Path) -> set[str]:
    doc = yaml.safe_load(path.read_text())
    return set(doc.get("accelerators", ["any"])) - {"any"}


def test_there_are_sweeps_to_check():
    assert any(p.name == "paper.yaml" for p in SWEEPS)


@pytest.mark.parametrize("sweep", SWEEPS, ids=lambda p: p.name)
@pytest.mark.parametrize("cluster", ["aws", "gcp", "kuberay"])
def test_sweep_accelerators_are_offered(sweep, cluster, request):
    config = request.getfixturevalue(cluster)
    missing = sweep_accelerators(sweep) - offered(config["available_node_types"])
    assert not missing, f"{sweep.name} pins runs to {sorted(missing)}, which no {cluster} worker type offers"


@pytest.mark.parametrize("sweep", SWEEPS, ids=lambda p: p.name)
def test_sweep_is_a_valid_spec(sweep):
    """The spec rejects unknown keys, archs and datasets; a sweep file must pass it before a cluster starts."""
    from orchestrator import spec

    s = spec.load(sweep)
    assert spec.expand(s) or spec.expand_probes(s)  # overhead_*.yaml: probes only
