"""One replica end to end inside a worker: noise settings -> workload -> train -> fingerprint ->
weights + one Parquet row. Knows nothing about Tune; the scheduler calls `run`.

Order matters: thread count and determinism switches are applied before CUDA starts and before
the model is built; the row is written after the weights, so a row always has its weights file.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import math
import os
from collections.abc import Callable
import traceback

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import save as safetensors_bytes

from orchestrator import entrypoint, fingerprint, malloc, noise, store
from orchestrator.axes import AXES
from orchestrator.spec import EntrypointWorkload, ProbeSpec, RunSpec
from workloads import data as datasets
from workloads import models
from workloads.train import SOLO, Rank, TrainConfig, sdpa_backend, train

# Runs this worker process started before the current one: workers are reused (warm), so a row
# says which process ran it and how warm it was.
_RUNS_IN_PROCESS = itertools.count()


@functools.lru_cache(maxsize=4)
def _dataset(name: str, root: str | None, args_json: str) -> datasets.ArrayDataset | datasets.ImageFolders:
    """Loaded once per worker process: Tune reuses actors, so replicas share the load cost."""
    return datasets.load(name, root, **json.loads(args_json))


def load_dataset(spec: RunSpec) -> datasets.ArrayDataset | datasets.ImageFolders:
    w = spec.workload
    return _dataset(w.dataset, w.dataset_root, json.dumps(w.dataset_args, sort_keys=True))


def weights_digest(state: dict[str, torch.Tensor], buffers: frozenset[str] = frozenset()) -> tuple[str, float]:
    """sha256 over every tensor's (name, dtype, shape, bytes) in sorted-name order, and the L2 norm
    of the floating-point tensors not named in `buffers`: equal digests mean bitwise-equal models
    (BatchNorm running statistics included), while the norm is the parameters' alone."""
    h, sq = hashlib.sha256(), 0.0
    for name in sorted(state):
        t = state[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        if t.is_floating_point() and name not in buffers:
            sq += float(t.double().pow(2).sum())
    return h.hexdigest(), math.sqrt(sq)


SKETCH_SIZE = 32  # numbers per epoch in a run's weight sketch


Plan = dict[str, tuple[torch.Tensor, torch.Tensor]]  # name -> (bucket, sign) per weight


def sketch_plan(state: dict[str, torch.Tensor], size: int = SKETCH_SIZE) -> Plan:
    """A fixed sparse random projection (CountSketch) of a model's floating-point weights: each
    weight goes to one of `size` buckets with a random sign. Drawn from a fixed seed over the sorted
    names and shapes, so every run of one workload gets the same projection and the distance between
    two runs' sketches estimates the L2 distance of their weights (unbiased in the square), at the
    cost of one pass over the weights: a few dozen numbers per epoch instead of the weights."""
    g = torch.Generator().manual_seed(0)
    return {name: (torch.randint(0, size, (state[name].numel(),), generator=g),
                   torch.randint(0, 2, (state[name].numel(),), generator=g, dtype=torch.float64) * 2 - 1)
            for name in sorted(state) if state[name].is_floating_point()}


def weights_sketch(state: dict[str, torch.Tensor], plan: Plan, size: int = SKETCH_SIZE) -> list[float]:
    """The weights projected by `plan` (sketch_plan): `size` float64 numbers."""
    out = torch.zeros(size, dtype=torch.float64)
    for name, (bucket, sign) in plan.items():
        out.index_add_(0, bucket, state[name].detach().reshape(-1).cpu().double() * sign)
    return out.tolist()


def epoch_recorder(buffers: frozenset[str]) -> tuple[Callable[[torch.nn.Module], None], dict[str, list]]:
    """`train`'s on_epoch callback and the row columns it fills: each epoch's weights digest
    (weights_digest) and sketch (weights_sketch), so tables can say at which epoch two runs part."""
    columns: dict[str, list] = {"epoch_weights_sha256": [], "epoch_sketch": []}
    plans: list[Plan] = []  # drawn at the first epoch, from the model's names and shapes

    def record(model: torch.nn.Module) -> None:
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        if not plans:
            plans.append(sketch_plan(state))
        columns["epoch_weights_sha256"].append(weights_digest(state, buffers)[0])
        columns["epoch_sketch"].append(weights_sketch(state, plans[0]))
    return record, columns


def buffer_names(model: torch.nn.Module) -> frozenset[str]:
    """State-dict entries that are not parameters (BatchNorm running statistics, counters); a
    parameter shared under two names is still a parameter."""
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    return frozenset(n for n in model.state_dict() if n not in params)


def base_row(spec: RunSpec) -> dict:
    """The columns known before anything runs; the scheduler uses it to record a worker death."""
    w = spec.workload
    return {"run_id": spec.run_id, "sweep": spec.sweep, "arch": w.arch, "dataset": w.dataset,
            "noise": spec.noise, **{f"vary_{s}": s in spec.vary for s in noise.SOURCES},
            "replica": spec.replica, "seed_init": spec.seeds.init, "seed_order": spec.seeds.order,
            "seed_augment": spec.seeds.augment, "seed_bitflip": spec.seeds.bitflip,
            "accelerator_requested": spec.accelerator,
            "spec_json": spec.model_dump_json(), "epochs": w.epochs,
            **{a.column: a.cell(getattr(spec, a.name)) for a in AXES},
            # the evaluation batch the built-in loop uses (null asks for the training batch); a user's own as asked
            "eval_batch_size": spec.eval_batch_size or getattr(w, "batch_size", None),
            "stack_spec": spec.stack.model_dump_json(exclude_defaults=True)}


def pick_device(spec: RunSpec) -> torch.device:
    """CUDA when the run was given a GPU and torch can see one; otherwise the CPU, and the row's
    `accelerator` column says `cpu` so a fallback is never mistaken for a GPU result."""
    return torch.device("cuda") if spec.gpus > 0 and torch.cuda.is_available() else torch.device("cpu")


def _write_labels(fs, root: str, name: str, labels: torch.Tensor, subgroups: torch.Tensor | None = None) -> None:
    """Test labels (and subgroup ids) once per dataset, not once per run."""
    path = store.labels_path(root, name)
    if not store.exists(fs, path):
        sub = subgroups if subgroups is not None else torch.full_like(labels, -1)
        store.write_table(fs, path, pa.table({"label": labels.numpy().astype("int32"),
                                               "subgroup": sub.numpy().astype("int32")},
                                              schema=store.LABELS_SCHEMA))


def _check_labels(fs, root: str, name: str, labels) -> None:
    """A user function's labels must be the test set every run of its dataset saw, in the same
    order: predictions are compared example by example across runs (churn)."""
    path = store.labels_path(root, name)
    if store.exists(fs, path):
        stored = pq.read_table(path, filesystem=fs, columns=["label"])["label"].to_numpy()
        if len(stored) != len(labels) or (stored != labels).any():
            raise entrypoint.ContractError(
                f"labels differ from those of dataset {name!r} stored by an earlier run ({path}); "
                "return the same test set in a fixed order (no shuffling in the eval loader)")
    _write_labels(fs, root, name, torch.from_numpy(labels))


def build_workload(spec: RunSpec | ProbeSpec) -> tuple[datasets.ArrayDataset | datasets.ImageFolders
                                                       | datasets.TokenDataset, torch.nn.Module, TrainConfig]:
    """Dataset (cached per worker), model initialised from the init seed, and the training config:
    shared by the replica runner and the overhead probe, so both time and train the same thing."""
    w = spec.workload
    data = load_dataset(spec)
    with torch.random.fork_rng(devices=[]):  # init has its own stream, leaves global RNG alone
        torch.manual_seed(spec.seeds.init)
        model = models.build(w.arch, data.input_shape, data.num_classes, **w.arch_args)
    cfg = TrainConfig(epochs=w.epochs, batch_size=w.batch_size, lr=w.lr, optimizer=w.optimizer,
                      momentum=w.momentum, weight_decay=w.weight_decay, schedule=w.schedule,
                      warmup_epochs=w.warmup_epochs, grad_clip=w.grad_clip, augmentation=w.augmentation,
                      precision=spec.precision, channels_last=spec.channels_last, compile=spec.compile,
                      eval_batch_size=spec.eval_batch_size)
    return data, model, cfg


def augment_streams(seeds: noise.Seeds, device: torch.device) -> torch.Generator:
    """Seed the augment source's two streams: torch's global RNG (dropout and any other global-RNG
    op) from its own derived seed, and the returned crop/flip generator on `device`. Shared by the
    replica runner and the overhead probe."""
    torch.manual_seed(seeds.global_rng)
    return torch.Generator(device).manual_seed(seeds.augment)


def train_one(spec: RunSpec, fs, root: str, device: torch.device, rank: Rank = SOLO) -> dict:
    """The successful path: returns the result columns and writes the weights file. For the built-in
    loop its metadata names the buffers (`{"buffers": JSON list}`) so that readers can tell them from
    parameters; a user function's state_dict comes without its module, so its buffers are unknown.
    In a data-parallel replica every rank trains and only rank 0 returns columns and writes files."""
    malloc.keep_freed_memory()  # no page-fault churn per step on a CPU; timing only, never bits
    torch.set_num_threads(spec.num_threads)
    flags = noise.apply_impl("impl" not in spec.vary, spec.cudnn_benchmark, spec.compile)
    buffers, flipped = None, None  # buffers unknown for a user function's state_dict: no module to ask
    if isinstance(spec.workload, EntrypointWorkload):  # the user's own training function
        with sdpa_backend(spec.attention, device):
            returned = entrypoint.call(spec, device, rank)
        if returned is None:  # a rank other than 0
            return {}
        result, labels, extra = returned
        _check_labels(fs, root, store.labels_name(spec.workload.model_dump(mode="json")), labels)
    else:
        data, model, cfg = build_workload(spec)
        if spec.seeds.bitflip is not None:
            flipped = noise.flip_lowest_bit(model, spec.seeds.bitflip)
        if rank.rank == 0:
            _write_labels(fs, root, store.labels_name(spec.workload.model_dump(mode="json")), data.test_y,
                          data.subgroups)
        aug = augment_streams(spec.seeds.for_rank(rank.rank), device)
        order = torch.Generator().manual_seed(spec.seeds.order)
        buffers = buffer_names(model)
        on_epoch, epoch_columns = epoch_recorder(buffers)
        with sdpa_backend(spec.attention, device):
            result = train(model, data, cfg, order, aug, device, rank, on_epoch)
        if result is None:  # a rank other than 0
            return {}
        extra = {"epoch_lr": result.epoch_lr, "epoch_loss": result.epoch_loss,
                 "attention_backend": result.attention_backend, **epoch_columns}
    row = {"status": "ok", "bitflip": flipped, "impl_flags": json.dumps(flags, sort_keys=True),
           "train_seconds": sum(result.epoch_seconds), "epoch_seconds": result.epoch_seconds,
           "test_accuracy": result.test_accuracy, "test_loss": result.test_loss,
           "per_class_accuracy": result.per_class_accuracy,
           "predictions": result.predictions.to(torch.int32).tolist()}
    if result.state_dict is not None:  # a user function may return no weights
        digest, norm = weights_digest(result.state_dict, buffers or frozenset())
        metadata = None if buffers is None else {"buffers": json.dumps(sorted(buffers))}
        store.write_bytes(fs, store.weights_path(root, spec.run_id), safetensors_bytes(result.state_dict, metadata))
        row |= {"weights_sha256": digest, "weights_norm": norm}
    return row | extra


def rank_columns(fp: dict, rank: Rank) -> dict:
    """Every rank's process, node and fingerprint, gathered on every rank (a collective: all ranks
    call it): one entry per rank, and whether the fingerprints agree (a replica spread over mixed
    nodes is flagged, not hidden)."""
    mine = (os.getpid(), fp.get("ray_node_id"), fp["fingerprint_id"])
    if rank.world_size == 1:
        every, backend = [mine], None
    else:
        every, backend = [None] * rank.world_size, torch.distributed.get_backend()
        torch.distributed.all_gather_object(every, mine)
    return {"dist_backend": backend, "rank_pids": [p for p, _, _ in every], "rank_nodes": [n for _, n, _ in every],
            "ranks_agree": len({f for _, _, f in every}) == 1}


def last_frame(e: BaseException) -> str:
    """`file:line in function` of the innermost frame of the exception that started it all (the
    user's own line, not the wrapper that re-raised it), so the one-line error says where to look."""
    while e.__cause__ is not None:
        e = e.__cause__
    frames = traceback.extract_tb(e.__traceback__)
    return f"{frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name}" if frames else "unknown frame"


def failure_columns(e: BaseException) -> dict:
    """A failed run's row columns: the one-line error ending in its last frame, and the full
    traceback (chained causes included) for OUT/logs/<run_id>.log."""
    return {"status": "failed", "error": f"{type(e).__name__}: {e} (at {last_frame(e)})",
            "traceback": "".join(traceback.format_exception(e))}


def run(spec: RunSpec, out: str, rank: Rank = SOLO, attempts: int = 1) -> dict:
    """Run one replica and write its row. A training error (including divergence) is recorded as
    status=failed with the error and returned, never raised: one bad replica must not stop a sweep.
    A rank of a data-parallel replica raises instead: its coordinator then stops every rank (the
    others would wait in a collective) and records which rank failed (orchestrator/worker.py).
    `attempts`: the how-many-th try this is (a try before it lost its process)."""
    fs, root = store.resolve(out)
    row = base_row(spec) | {"worker_pid": os.getpid(), "worker_runs": next(_RUNS_IN_PROCESS), "attempts": attempts}
    device = pick_device(spec)  # a rank's process sees only its own GPU
    try:
        row |= train_one(spec, fs, root, device, rank)
    except Exception as e:  # recorded, not dropped: the row says what went wrong
        if rank.world_size > 1:
            raise
        row |= failure_columns(e)
        # tried once: the row keeps the same traceback, and when the error was OUT's storage failing
        # (the weights write, after its tries) three more tries only held the slot ~4 s longer
        store.write_bytes(fs, store.log_path(root, spec.run_id), row["traceback"].encode(), tries=1)
    row |= fingerprint.collect(device, spec.compile, spec.stack.packages())
    row |= rank_columns(row, rank)
    if rank.rank == 0:
        store.write_run(fs, root, row)
    return row
