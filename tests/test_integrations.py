"""Framework adapters (orchestrator/integrations): the shipped Hugging Face Trainer and Lightning
examples run in-process through runner.run under each preset, then both at world size 2 in one sweep on a
real local Ray cluster."""

import json
import os

import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

from orchestrator import runner, store, sweep
from orchestrator.spec import expand, parse
from tests.conftest import ROOT, write_spec

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


def shipped(sweep_file: str, **args) -> dict:
    """The workload of a shipped sweep file, its arguments shrunk for a test."""
    workload = yaml.safe_load((ROOT / "sweeps" / sweep_file).read_text())["workloads"][0]
    return workload | {"args": workload["args"] | args}


@pytest.fixture(scope="module")
def ddp_rows(ray_local, tmp_path_factory):
    """One sweep on a real local Ray cluster at world size 2 (1 CPU per rank): control replicas of
    both shipped examples, run one after the other by the same group of two rank processes. The HF
    test set (128) is predicted in per-rank batches of 48: sharded over the ranks, the last padded."""
    pytest.importorskip("transformers")
    pytest.importorskip("lightning")
    out = tmp_path_factory.mktemp("ddp")
    workloads = [shipped("hf_trainer.yaml", epochs=1, n_train=128, eval_batch_size=48),
                 shipped("lightning_module.yaml", epochs=1)]
    spec = write_spec(out / "s.yaml", noise=["control"], resources={"cpus": 1}, tooling={"world_size": [2]},
                      workloads=workloads)
    assert sweep.main([str(spec), "--out", str(out)]) == 0
    return out, store.read_runs(str(out)).to_pandas()


def final_weights(out, row, model: torch.nn.Module) -> torch.nn.Module:
    """`model` with the run's saved final weights, in eval mode: the row's predictions must be its own."""
    model.load_state_dict(load_file(store.weights_path(str(out), row.run_id)))
    return model.eval()


def check_ddp(df, arch: str, n_train: int) -> pd.Series:
    runs = df[df.arch == arch]
    assert len(runs) == 2 and (runs.status == "ok").all(), runs.error.tolist()
    assert runs.weights_sha256.nunique() == 1  # control at world size 2: bitwise identical
    for r in runs.itertuples():
        assert r.world_size == 2 and r.dist_backend == "gloo" and len(set(r.rank_pids)) == 2
        assert json.loads(r.epoch_metrics)[0]["served"] == n_train // 2  # rank 0 trained on its half
        assert "the script's seed" in r.note  # the example's own seed, replaced and noted
    return runs.iloc[0]


@pytest.mark.integration
def test_hf_trainer_at_world_size_2(ddp_rows):
    from examples.hf_trainer import Sequences, make_model

    out, df = ddp_rows
    row = check_ddp(df, "tiny_bert", n_train=128)
    assert "per_device_train_batch_size=32 replaced by 16" in row.note  # the global batch stays 32
    with torch.no_grad():
        logits = final_weights(out, row, make_model())(input_ids=Sequences(128, seed=1).ids).logits
    assert list(row.predictions) == logits.argmax(-1).tolist()  # the whole test set, in order


@pytest.mark.integration
def test_lightning_at_world_size_2(ddp_rows):
    from examples.lightning_module import DigitsModule
    from examples.own_training import Digits

    out, df = ddp_rows
    row = check_ddp(df, "digits_lit", n_train=len(Digits(train=True)))
    with torch.no_grad():
        logits = final_weights(out, row, DigitsModule(lr=0.0)).net(Digits(train=False).x)
    assert list(row.predictions) == logits.argmax(-1).tolist()  # the whole test set, in order
