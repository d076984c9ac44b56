"""Framework adapters (orchestrator/integrations): the shipped Hugging Face Trainer and Lightning
examples run in-process through runner.run under each preset, then a sweep on a real local Ray cluster."""

import json
import os

import pytest
import yaml

from orchestrator import runner, store, sweep
from orchestrator.spec import expand, parse
from tests.conftest import ROOT

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing is downloaded: models come from configs

WORKLOADS = {
    "hf": {"entrypoint": "examples.hf_trainer:main", "name": "tiny_bert", "dataset": "sequences",
           "args": {"epochs": 2, "n_train": 128}},
    "lightning": {"entrypoint": "examples.lightning_module:main", "name": "digits_lit", "dataset": "sklearn_digits",
                  "args": {"epochs": 2}},
}
# what each example's script passes itself, and a process-wide setting its framework writes
NOTED = {"hf": ("the script's seed=42 replaced by", "CUBLAS_WORKSPACE_CONFIG: :4096:8 -> :16:8", "CUDA_LAUNCH_BLOCKING"),
         "lightning": ("the script's seed_everything=42 replaced by", "PL_GLOBAL_SEED: None -> ", "PL_GLOBAL_SEED")}


def rows(tmp_path, workload, noise, replicas):
    spec = parse({"name": "t", "replicas": replicas, "noise": [noise], "workloads": [workload]})
    return [runner.run(r, str(tmp_path)) for r in expand(spec)]


def orders(row):
    return tuple(m["order_digest"] for m in json.loads(row["epoch_metrics"]))


@pytest.fixture(scope="module", params=["hf", "lightning"])
def framework(request):
    pytest.importorskip({"hf": "transformers", "lightning": "lightning"}[request.param])
    return request.param


@pytest.fixture(scope="module")
def preset_rows(framework, tmp_path_factory):
    out = tmp_path_factory.mktemp(framework)
    return {noise: rows(out, WORKLOADS[framework], noise, n) for noise, n in
            (("control", 2), ("init", 2), ("order", 2), ("algo", 3))}


def test_control_replicas_are_bitwise_identical(preset_rows):
    a, b = preset_rows["control"]
    assert a["status"] == b["status"] == "ok", (a.get("error"), b.get("error"))
    assert a["weights_sha256"] == b["weights_sha256"] and a["predictions"] == b["predictions"]
    assert orders(a) == orders(b) and len(orders(a)) == 2 and orders(a)[0] != orders(a)[1]


def test_init_preset_varies_weights_only_not_the_batch_order(preset_rows):
    a, b = preset_rows["init"]
    assert a["seed_init"] != b["seed_init"] and a["weights_sha256"] != b["weights_sha256"]
    assert orders(a) == orders(b) == orders(preset_rows["control"][0])


def test_order_preset_varies_the_batch_order_from_the_same_start(preset_rows):
    a, b = preset_rows["order"]
    assert a["seed_init"] == b["seed_init"] and a["seed_augment"] == b["seed_augment"]
    assert orders(a)[0] != orders(b)[0] and a["weights_sha256"] != b["weights_sha256"]


def test_algo_replicas_all_distinct(preset_rows):
    algo = preset_rows["algo"]
    assert all(r["status"] == "ok" for r in algo)
    assert len({r["weights_sha256"] for r in algo}) == 3 and len({orders(r) for r in algo}) == 3


def test_framework_globals_and_the_script_s_own_seed_are_noted_and_undone(framework, preset_rows):
    script, setting, variable = NOTED[framework]
    note = preset_rows["control"][0]["note"]
    assert script in note  # the example passes 42 as a user's script would
    assert setting in note and "restored after the run" in note
    assert os.environ.get(variable) is None  # what the framework set process-wide is undone


@pytest.mark.integration
def test_hf_sweep_through_ray(ray_local, tmp_path):
    doc = yaml.safe_load((ROOT / "sweeps/hf_trainer.yaml").read_text())
    doc |= {"replicas": 2, "noise": ["control"]}
    doc["workloads"][0]["args"] |= {"epochs": 1, "n_train": 64}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(doc))
    assert sweep.main([str(tmp_path / "s.yaml"), "--out", str(tmp_path / "out")]) == 0
    df = store.read_runs(str(tmp_path / "out")).to_pandas()
    assert len(df) == 2 and (df.status == "ok").all() and df.weights_sha256.nunique() == 1
    assert df.note.str.contains("replaced by").all()
