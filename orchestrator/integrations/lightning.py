"""Lightning under the harness: `seed_everything`, `trainer`, `train_loader` and `fit_predict`
replace `L.seed_everything(42)`, `L.Trainer(...)`, the training DataLoader's shuffle and the
script's fit/test calls.

How each source stays apart (lightning >= 2.2):
- init: `seed_everything(ctx)` seeds torch, random and numpy from `init`, so a module built after it
  (the usual order) takes its weights from init; the script's own number is replaced, and noted.
- order: the training DataLoader draws each epoch's permutation from `order` (`train_loader`), this
  rank's share of it at world size > 1 (Lightning's DistributedSampler, seeded from its global
  seed, is switched off).
- augment: when fitting starts the adapter's callback reseeds torch, random and numpy from `augment`,
  so dropout and in-process augmentation draw from augment, not from what init left.
- impl: `Trainer(deterministic=ctx.deterministic, benchmark=<the harness's cudnn.benchmark>)`.
- precision: `bf16-mixed` for bf16, else `32-true` (TF32, threads, SDPA kernel: set by the harness).
- world size: at `world_size > 1` the Trainer runs DDP inside the ranks the harness started (a
  ClusterEnvironment that reads ctx; the process group is already set up, so Lightning reuses it).
`seed_everything` writes PL_GLOBAL_SEED (and PL_SEED_WORKERS), which Lightning's own worker seeding
reads: those and `deterministic`'s CUBLAS_WORKSPACE_CONFIG are noted in the row and undone after.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator

import lightning as L
import numpy as np
import torch
from lightning.pytorch.plugins.environments import ClusterEnvironment
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader, Sampler

from orchestrator.integrations import contained, override

FRAMEWORK = "lightning"
QUIET = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
         "enable_model_summary": False}


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def seed_everything(ctx, seed: int | None = None) -> int:
    """In place of `L.seed_everything(seed)`: Lightning's own call (its env variables included, which
    `contained` notes and undoes) with the init seed; a script's `seed` is replaced and noted."""
    init = ctx.seed("init") % 2**32
    override(ctx, FRAMEWORK, {} if seed is None else {"seed_everything": seed}, {"seed_everything": init})
    with contained(ctx, FRAMEWORK):
        return L.seed_everything(init, verbose=False)


class OrderSampler(Sampler[int]):
    """Each epoch a new permutation from the order source's generator, this rank's share of it
    (`ctx.shard`: the whole of it at world size 1)."""

    def __init__(self, ctx, n: int):
        self.ctx, self.n, self.generator = ctx, n, ctx.generator("order")

    def __iter__(self) -> Iterator[int]:
        return iter(self.ctx.shard(torch.randperm(self.n, generator=self.generator)).tolist())

    def __len__(self) -> int:
        return len(self.ctx.shard(torch.arange(self.n)))


def train_loader(ctx, dataset, batch_size: int = 1, **kwargs) -> DataLoader:
    """`DataLoader(dataset, batch_size, shuffle=True, **kwargs)` shuffled by the order source;
    `batch_size` is the global batch (the script's at world size 1), split over the ranks."""
    kwargs.pop("shuffle", None)
    return DataLoader(dataset, ctx.per_rank(batch_size), sampler=OrderSampler(ctx, len(dataset)), **kwargs)


class HarnessRanks(ClusterEnvironment):
    """The ranks the harness started, as Lightning's cluster: it launches nothing."""

    def __init__(self, ctx):
        super().__init__()
        self.ctx = ctx

    @property
    def creates_processes_externally(self) -> bool:
        return True

    @property
    def main_address(self) -> str:
        return os.environ.get("MASTER_ADDR", "127.0.0.1")

    @property
    def main_port(self) -> int:
        return int(os.environ.get("MASTER_PORT", 0))

    @staticmethod
    def detect() -> bool:
        return True

    def world_size(self) -> int:
        return self.ctx.world_size

    def set_world_size(self, size: int) -> None:
        """The harness's world size stands; Lightning's own count is not used."""

    def global_rank(self) -> int:
        return self.ctx.rank

    def set_global_rank(self, rank: int) -> None:
        """The harness's rank stands."""

    def local_rank(self) -> int:
        """0: each rank is its own node of one device (preset_arguments), its device index 0."""
        return 0

    def node_rank(self) -> int:
        return self.ctx.rank


class _Harness(L.Callback):
    """Augment's stream from fit's start; ctx.report once per training epoch (epoch_seconds), with
    the script's own `epoch_metrics()` (e.g. a digest of the batch order it saw)."""

    def __init__(self, ctx, epoch_metrics: Callable[[], dict] | None):
        self.ctx, self.epoch_metrics = ctx, epoch_metrics or dict

    def on_train_start(self, trainer, pl_module):
        _seed_all(self.ctx.seed("augment"))

    def on_train_epoch_end(self, trainer, pl_module):
        self.ctx.report(epoch=trainer.current_epoch + 1, **self.epoch_metrics())


def preset_arguments(ctx) -> dict:
    """The Trainer arguments the run's preset decides. Data-parallel: DDP in the harness's ranks, each
    rank a node of one device (`num_nodes` = world size, `devices` = 1), the layout Lightning uses for
    one GPU per machine. A rank's process sees only its own device (Ray gives each rank actor its
    GPU), so `devices=k` asked for k GPUs one process cannot see; the same arguments hold on CPUs."""
    args = {"deterministic": ctx.deterministic, "benchmark": torch.backends.cudnn.benchmark,
            "precision": "bf16-mixed" if ctx.precision == "bf16" else "32-true",
            "accelerator": "gpu" if ctx.device.type == "cuda" else "cpu", "devices": 1}
    if ctx.world_size > 1:
        args |= {"num_nodes": ctx.world_size, "use_distributed_sampler": False,
                 "strategy": DDPStrategy(cluster_environment=HarnessRanks(ctx),
                                         process_group_backend=torch.distributed.get_backend())}
    return args


def trainer(ctx, epoch_metrics: Callable[[], dict] | None = None, **kwargs) -> L.Trainer:
    """`L.Trainer(**kwargs)` with determinism, precision and device from ctx, logging off unless asked."""
    kwargs = override(ctx, FRAMEWORK, QUIET | kwargs, preset_arguments(ctx))
    kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), _Harness(ctx, epoch_metrics)]
    with contained(ctx, FRAMEWORK):
        return L.Trainer(**kwargs)


def fit_predict(ctx, trainer: L.Trainer, module: L.LightningModule, train: DataLoader,
                test: DataLoader) -> dict | None:
    """Fit, then the Trainer's own `predict` on `test` (its `predict_step` returns logits; batches end
    with their labels): the harness's {predictions, labels, state_dict}; None on ranks other than 0
    (every rank predicts the whole test set: no distributed sampler)."""
    with contained(ctx, FRAMEWORK):
        trainer.fit(module, train)
        logits = trainer.predict(module, test)
    if ctx.rank:
        return None
    return {"predictions": torch.cat([lg.argmax(-1) for lg in logits]).cpu(),
            "labels": torch.cat([batch[-1] for batch in test]), "state_dict": module.state_dict()}
