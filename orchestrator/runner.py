"""One replica end to end inside a worker: noise settings -> workload -> train -> fingerprint ->
weights + one Parquet row. Knows nothing about Tune; the scheduler calls `run`.

Order matters: thread count and determinism switches are applied before CUDA starts and before
the model is built; the row is written after the weights, so a row always has its weights file.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math

import pyarrow as pa
import torch
from safetensors.torch import save as safetensors_bytes

from orchestrator import fingerprint, malloc, noise, store
from orchestrator.spec import ProbeSpec, RunSpec
from workloads import data as datasets
from workloads import models
from workloads.train import TrainConfig, train


@functools.lru_cache(maxsize=4)
def _dataset(name: str, root: str | None, args_json: str) -> datasets.ArrayDataset:
    """Loaded once per worker process: Tune reuses actors, so replicas share the load cost."""
    return datasets.load(name, root, **json.loads(args_json))


def load_dataset(spec: RunSpec) -> datasets.ArrayDataset:
    w = spec.workload
    return _dataset(w.dataset, w.dataset_root, json.dumps(w.dataset_args, sort_keys=True))


def weights_digest(state: dict[str, torch.Tensor]) -> tuple[str, float]:
    """sha256 over (name, dtype, shape, bytes) in sorted-name order, and the L2 norm of the
    floating-point tensors: equal digests mean bitwise-equal models."""
    h, sq = hashlib.sha256(), 0.0
    for name in sorted(state):
        t = state[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        if t.is_floating_point():
            sq += float(t.double().pow(2).sum())
    return h.hexdigest(), math.sqrt(sq)


def base_row(spec: RunSpec) -> dict:
    """The columns known before anything runs; the scheduler uses it to record a worker death."""
    w = spec.workload
    return {"run_id": spec.run_id, "sweep": spec.sweep, "arch": w.arch, "dataset": w.dataset,
            "noise": spec.noise, **{f"vary_{s}": s in spec.vary for s in noise.SOURCES},
            "replica": spec.replica, "seed_init": spec.seeds.init, "seed_order": spec.seeds.order,
            "seed_augment": spec.seeds.augment, "seed_bitflip": spec.seeds.bitflip,
            "accelerator_requested": spec.accelerator,
            "spec_json": spec.model_dump_json(), "epochs": w.epochs,
            "precision": spec.precision, "channels_last": spec.channels_last, "compiled": spec.compile}


def pick_device(spec: RunSpec) -> torch.device:
    """CUDA when the run was given a GPU and torch can see one; otherwise the CPU, and the row's
    `accelerator` column says `cpu` so a fallback is never mistaken for a GPU result."""
    return torch.device("cuda") if spec.gpus > 0 and torch.cuda.is_available() else torch.device("cpu")


def _write_labels(fs, root: str, name: str, data: datasets.ArrayDataset) -> None:
    """Test labels (and subgroup ids) once per dataset, not once per run."""
    path = store.labels_path(root, name)
    if not store.exists(fs, path):
        sub = data.subgroups if data.subgroups is not None else torch.full_like(data.test_y, -1)
        store.write_table(fs, path, pa.table({"label": data.test_y.numpy().astype("int32"),
                                               "subgroup": sub.numpy().astype("int32")},
                                              schema=store.LABELS_SCHEMA))


def build_workload(spec: RunSpec | ProbeSpec) -> tuple[datasets.ArrayDataset, torch.nn.Module, TrainConfig]:
    """Dataset (cached per worker), model initialised from the init seed, and the training config:
    shared by the replica runner and the overhead probe, so both time and train the same thing."""
    w = spec.workload
    data = load_dataset(spec)
    with torch.random.fork_rng(devices=[]):  # init has its own stream, leaves global RNG alone
        torch.manual_seed(spec.seeds.init)
        model = models.build(w.arch, data.image_shape, data.num_classes, **w.arch_args)
    cfg = TrainConfig(epochs=w.epochs, batch_size=w.batch_size, lr=w.lr, optimizer=w.optimizer,
                      momentum=w.momentum, weight_decay=w.weight_decay, augmentation=w.augmentation,
                      precision=spec.precision, channels_last=spec.channels_last, compile=spec.compile)
    return data, model, cfg


def train_one(spec: RunSpec, fs, root: str) -> dict:
    """The successful path: returns the result columns and writes the weights file."""
    malloc.keep_freed_memory()  # no page-fault churn per step on a CPU; timing only, never bits
    torch.set_num_threads(spec.num_threads)
    flags = noise.apply_impl(deterministic="impl" not in spec.vary)
    device = pick_device(spec)
    data, model, cfg = build_workload(spec)
    flipped = noise.flip_lowest_bit(model, spec.seeds.bitflip) if spec.seeds.bitflip is not None else None
    _write_labels(fs, root, spec.workload.dataset, data)
    torch.manual_seed(spec.seeds.augment)  # dropout and any other global-RNG op
    order = torch.Generator().manual_seed(spec.seeds.order)
    aug = torch.Generator(device).manual_seed(spec.seeds.augment)
    result = train(model, data, cfg, order, aug, device)
    digest, norm = weights_digest(result.state_dict)
    store.write_bytes(fs, store.weights_path(root, spec.run_id), safetensors_bytes(result.state_dict))
    return {"status": "ok", "bitflip": flipped, "impl_flags": json.dumps(flags, sort_keys=True),
            "train_seconds": sum(result.epoch_seconds), "epoch_seconds": result.epoch_seconds,
            "test_accuracy": result.test_accuracy, "test_loss": result.test_loss,
            "per_class_accuracy": result.per_class_accuracy,
            "predictions": result.predictions.to(torch.int32).tolist(),
            "weights_sha256": digest, "weights_norm": norm}


def run(spec: RunSpec, out: str) -> dict:
    """Run one replica and write its row. A training error (including divergence) is recorded as
    status=failed with the error and returned, never raised: one bad replica must not stop a sweep."""
    fs, root = store.resolve(out)
    row = base_row(spec)
    try:
        row |= train_one(spec, fs, root)
    except Exception as e:  # recorded, not dropped: the row says what went wrong
        row |= {"status": "failed", "error": f"{type(e).__name__}: {e}"}
    row |= fingerprint.collect()
    store.write_run(fs, root, row)
    return row
