"""The user's own training function inside a worker: the `ctx` it is called with, and the check of
what it returns.

The runner has already applied the run's thread count and determinism switches when `call` runs;
`call` adds the TF32 switch and the global seeds, then runs `fn(ctx, **args)`. The function owns
everything else (model, DataLoader, optimiser, schedule, eval loop) and hands back test-set
predictions and labels; the orchestrator computes accuracy and every table from those, so a user
function cannot report a number the tables would not reproduce.

Seeds: `ctx.seed(source)` is the replica's seed where the sweep varies that source, the fixed one
where it does not (the same `RunSpec.seeds` the built-in loop uses). Before the call, torch's global
RNG is seeded from `init` (so an unchanged `model = Net()` initialises from the init source), and
Python's `random` and numpy's from `augment`. `ctx.worker_init_fn` reseeds each DataLoader worker
from (augment seed, epochs reported so far, worker id): deterministic for any `num_workers`, and
different every epoch as long as the function calls `ctx.report` once per epoch.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import random
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from orchestrator import noise
from orchestrator.noise import Seeds
from workloads.models import builder
from workloads.train import SOLO, Diverged, Rank, TrainResult, set_tf32, shard, sync

CONTRACT = ("the function must return {predictions, labels[, state_dict, test_loss]} with predictions and "
            "labels 1-D integer arrays of equal length in test-set order")


class ContractError(ValueError):
    """The function returned something the contract does not allow; the message says what."""


class EntrypointError(RuntimeError):
    """The user's function raised; the message names the function and its error, on one line."""


@dataclass
class Context:
    """What `fn(ctx, **args)` gets: the run's device, seeds and tooling settings (already applied)."""

    device: torch.device
    seeds: Seeds
    deterministic: bool  # deterministic kernels on (impl fixed); already set, do not change it
    num_threads: int  # torch intra-op threads; already set
    precision: str  # fp32 | tf32 | bf16; TF32 is already switched; bf16 = wrap forward+loss in torch.autocast
    channels_last: bool  # the sweep's memory-format axis: apply it to model and batches if you vary it
    compile: bool  # the sweep's torch.compile axis
    run_id: str
    # examples per evaluation batch (tooling.eval_batch_size) if the sweep varies it; None: your own choice.
    # The attention kernel (tooling.attention) needs nothing from you: the call runs inside sdpa_kernel
    eval_batch_size: int | None = None
    # data parallelism (tooling.world_size): with world_size > 1 the process group is set up (gloo
    # on CPUs, NCCL on GPUs), ready for DistributedDataParallel; only rank 0's return counts
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    reports: list[dict] = field(default_factory=list)  # one per ctx.report call
    notes: list[str] = field(default_factory=list)  # ctx.note calls: the row's `note`
    _last: float = field(default_factory=time.perf_counter)

    def seed(self, source: str) -> int:
        """The seed of `source` (init, order or augment) in this replica (augment: this rank's own)."""
        if source not in noise.ALGO:
            raise ValueError(f"ctx.seed: unknown source {source!r}; choose one of {', '.join(noise.ALGO)}")
        return getattr(self.seeds, source)

    def shard(self, indices: torch.Tensor) -> torch.Tensor:
        """This rank's share of `indices`, e.g. `ctx.shard(torch.randperm(n, generator=ctx.generator("order")))`
        as a DataLoader's sampler with batch_size = the global batch // ctx.world_size: its batches
        are the global batches split over the ranks (workloads.train.shard). The whole tensor at
        world size 1."""
        return shard(indices, Rank(self.rank, self.world_size))

    def per_rank(self, batch_size: int) -> int:
        """This rank's share of the global batch `batch_size` (the batch at world size 1): the world
        size axis keeps the global batch and splits it evenly, so only the distribution changes."""
        if batch_size % self.world_size:
            raise ValueError(f"batch size {batch_size} does not split evenly over {self.world_size} ranks; "
                             "pick a global batch the sweep's world sizes all divide")
        return batch_size // self.world_size

    def generator(self, source: str, device: torch.device | str | None = None) -> torch.Generator:
        """A fresh generator seeded from `source` (on `device`, default the CPU: samplers need one there)."""
        return torch.Generator(device or "cpu").manual_seed(self.seed(source))

    def worker_init_fn(self, worker_id: int) -> None:
        """Pass as `DataLoader(worker_init_fn=ctx.worker_init_fn)`: seeds torch, random and numpy in
        worker `worker_id` from the augment source and the number of epochs reported so far."""
        s = noise.derive_seed(self.seed("augment"), f"dataloader-epoch{len(self.reports)}", worker_id)
        torch.manual_seed(s)
        random.seed(s)
        np.random.seed(s % 2**32)

    def note(self, text: str) -> None:
        """Say something the row should carry (e.g. a process-wide setting a framework changed that
        mixes noise sources); repeats are kept once."""
        if text not in self.notes:
            self.notes.append(text)

    def report(self, epoch: int, **metrics: float) -> None:
        """Call once per epoch: records the seconds since the previous report (the device synchronised
        first) and the metrics. A metric that is NaN or inf stops the run: it diverged."""
        sync(self.device)
        now = time.perf_counter()
        values = {k: float(v) for k, v in metrics.items()}  # float(tensor): one sync, per epoch only
        bad = [f"{k}={v}" for k, v in values.items() if not math.isfinite(v)]
        if bad:
            raise Diverged(f"diverged at epoch {epoch}: {', '.join(bad)}")
        self.reports.append({"epoch": epoch, "seconds": now - self._last, **values})
        self._last = now


def _int_array(result: Mapping, key: str) -> np.ndarray:
    if key not in result:
        raise ContractError(f"no {key!r} in the returned mapping; {CONTRACT}")
    value = result[key]
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    a = np.asarray(value)
    if a.ndim != 1 or a.size == 0 or not np.issubdtype(a.dtype, np.integer) or a.min() < 0:
        raise ContractError(f"{key!r} is {a.dtype} of shape {a.shape}, not a non-empty 1-D array of "
                            f"class indices >= 0; {CONTRACT}")
    return a.astype(np.int64)


def _state_dict(value: object) -> dict[str, torch.Tensor] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping) or not all(isinstance(v, torch.Tensor) for v in value.values()):
        raise ContractError(f"'state_dict' must map names to tensors (model.state_dict()); {CONTRACT}")
    return {str(k): v.detach().cpu().contiguous() for k, v in value.items()}


def check(result: object, epoch_seconds: list[float]) -> tuple[TrainResult, np.ndarray]:
    """The function's return as a TrainResult (accuracy computed here, from predictions and labels)
    and the labels. Raises ContractError naming what breaks the contract."""
    if not isinstance(result, Mapping):
        raise ContractError(f"returned {type(result).__name__}; {CONTRACT}")
    pred, labels = _int_array(result, "predictions"), _int_array(result, "labels")
    if len(pred) != len(labels):
        raise ContractError(f"{len(pred)} predictions for {len(labels)} labels; {CONTRACT}")
    loss = result.get("test_loss")
    if loss is not None and not isinstance(loss, (int, float, np.floating, torch.Tensor)):
        raise ContractError(f"'test_loss' is {type(loss).__name__}, not a number; {CONTRACT}")
    acc, per_class = class_accuracy(pred, labels)
    return TrainResult(epoch_seconds, acc, math.nan if loss is None else float(loss), per_class,
                       torch.from_numpy(pred), _state_dict(result.get("state_dict"))), labels


def class_accuracy(preds: np.ndarray, labels: np.ndarray) -> tuple[float, list[float]]:
    """Accuracy and per-class accuracy (index = class, 0 for a class with no test example), from
    1-D integer predictions and labels of equal length. Here, not in `metrics`, which imports scipy:
    a worker process never needs it (~0.9 s of its start)."""
    correct = preds == labels
    n = int(labels.max()) + 1
    hits = np.bincount(labels, weights=correct, minlength=n)
    return float(correct.mean()), (hits / np.maximum(np.bincount(labels, minlength=n), 1)).tolist()


class Prefixed(io.TextIOBase):
    """A stream that starts each line with `prefix`. Ray prefixes a worker's output with its process
    only, and one process runs many replicas (and ranks interleave): a user's print says its run."""

    def __init__(self, stream, prefix: str):
        self.stream, self.prefix, self.at_start = stream, prefix, True

    def write(self, text: str) -> int:
        for part in text.splitlines(keepends=True):
            self.stream.write(self.prefix + part if self.at_start else part)
            self.at_start = part.endswith(("\n", "\r"))  # a progress bar's \r redraws its own line
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    @property
    def encoding(self) -> str:  # read by progress bars (tqdm, rich) to choose their characters
        return getattr(self.stream, "encoding", "utf-8")

    def isatty(self) -> bool:
        return False


@contextlib.contextmanager
def prefixed(prefix: str) -> Iterator[None]:
    """stdout and stderr prefixed for the block (Python-level writes; a C library's own are not)."""
    with (contextlib.redirect_stdout(Prefixed(sys.stdout, prefix)),
          contextlib.redirect_stderr(Prefixed(sys.stderr, prefix))):
        yield


def call(spec, device: torch.device, rank: Rank = SOLO) -> tuple[TrainResult, np.ndarray, dict] | None:
    """Run the user's function for `spec` (a RunSpec with an EntrypointWorkload) after the runner
    applied threads and determinism. Returns (result, test labels, row columns of its own:
    `epochs` = reports made, `train_seconds` = the whole call, `epoch_metrics` = the reports as JSON);
    None on ranks other than 0, whose return is not the result."""
    w = spec.workload
    seeds = spec.seeds.for_rank(rank.rank)
    ctx = Context(device=device, seeds=seeds, deterministic="impl" not in spec.vary,
                  num_threads=torch.get_num_threads(), precision=spec.precision,
                  channels_last=spec.channels_last, compile=spec.compile, run_id=spec.run_id,
                  eval_batch_size=spec.eval_batch_size, rank=rank.rank, world_size=rank.world_size,
                  local_rank=rank.local_rank)
    set_tf32(spec.precision == "tf32")
    torch.manual_seed(seeds.init)
    random.seed(seeds.augment)
    np.random.seed(seeds.augment % 2**32)
    fn = builder(w.entrypoint)
    t0 = time.perf_counter()
    try:
        with prefixed(f"[{spec.run_id}{f' rank {rank.rank}' if rank.world_size > 1 else ''}] "):
            result = fn(ctx, **w.args)
    except Diverged:
        raise
    except Exception as e:  # the user's error, kept, on one line (rows and the console show one line)
        raise EntrypointError(f"{w.entrypoint} raised {type(e).__name__}: {' '.join(str(e).split())}") from e
    seconds = time.perf_counter() - t0
    if rank.rank:
        return None
    result, labels = check(result, [r["seconds"] for r in ctx.reports])
    return result, labels, {"epochs": len(ctx.reports), "train_seconds": seconds,
                            "epoch_metrics": json.dumps(ctx.reports), "note": "; ".join(ctx.notes) or None}
