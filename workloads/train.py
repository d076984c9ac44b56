"""The training loop: the whole dataset on the device, batches and augmentation drawn from the
run's own generators, no DataLoader; or, for image folders too large for memory, a DataLoader
whose sampler hands each example a seed drawn from the run's generators (`folder_batches`).

Three generators, one per algorithmic noise source: `order` shuffles, `augment` draws crops and
flips (the runner also seeds the global RNG, which dropout uses, with a seed derived from the
augment seed: controlled by the augment source, yet a stream apart from the augment generator's).
Initialisation happened before this loop, from the `init` source. So each source can be held
fixed or varied on its own.

Tooling options change bits without being random: `precision` (fp32 | tf32 | bf16 autocast),
`channels_last` (NHWC model and batches) and `compile` (torch.compile). `train_step` is the one
optimiser step both the training loop and the determinism-overhead probe time.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from workloads.data import ArrayDataset, DecodedImages, ImageFolders


class Diverged(RuntimeError):
    """The loss became NaN or inf: the run stops and is recorded failed, not silently kept."""


@dataclass(frozen=True)
class TrainConfig:
    epochs: int
    batch_size: int
    lr: float
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    augmentation: str = "none"  # none | crop | flip | crop+flip
    precision: str = "fp32"  # fp32 (IEEE, TF32 off) | tf32 (TF32 matmul+conv on CUDA) | bf16 (autocast)
    channels_last: bool = False  # NHWC memory format for model and batches
    compile: bool = False  # torch.compile the model (its first steps compile)


@dataclass
class TrainResult:
    epoch_seconds: list[float]
    test_accuracy: float
    test_loss: float
    per_class_accuracy: list[float]
    predictions: torch.Tensor  # (N_test,) int64, dataset order, on the CPU
    state_dict: dict[str, torch.Tensor]  # final weights, on the CPU, contiguous (also after channels_last)


def sync(device: torch.device) -> None:
    """Wait for queued kernels so a wall-clock read measures work done, not work launched."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def augment(x: torch.Tensor, mode: str, g: torch.Generator) -> torch.Tensor:
    """Random crop (zero padding of 1/8 of the side) and/or horizontal flip, per example, on x's
    device. x: (B, C, H, W)."""
    b, _, h, w = x.shape
    if "crop" in mode:
        p = max(1, h // 8)
        padded = F.pad(x, (p, p, p, p))
        dy = torch.randint(0, 2 * p + 1, (b, 1), generator=g, device=x.device)
        dx = torch.randint(0, 2 * p + 1, (b, 1), generator=g, device=x.device)
        rows = (dy + torch.arange(h, device=x.device))[:, :, None]  # (B, H, 1)
        cols = (dx + torch.arange(w, device=x.device))[:, None, :]  # (B, 1, W)
        x = padded.permute(0, 2, 3, 1)[torch.arange(b, device=x.device)[:, None, None], rows, cols]
        x = x.permute(0, 3, 1, 2).contiguous()  # (B, H, W, C) -> (B, C, H, W)
    if "flip" in mode:
        flip = torch.rand(b, generator=g, device=x.device) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x


def set_tf32(enabled: bool) -> dict[str, str]:
    """TF32 on or off for CUDA matmuls and cuDNN; returns what was set. Off must be set explicitly:
    cuDNN convolutions default to TF32 on Ampere and later, so "fp32" would otherwise not be fp32.
    No effect on a CPU. torch >= 2.9 has per-backend `fp32_precision` and raises when code mixes it
    with the legacy `allow_tf32` flags, so the new API is used where it exists."""
    mode = "tf32" if enabled else "ieee"
    if hasattr(torch.backends, "fp32_precision"):
        torch.backends.cuda.matmul.fp32_precision = mode
        torch.backends.cudnn.conv.fp32_precision = mode
        torch.backends.cudnn.rnn.fp32_precision = mode
    else:  # pragma: no cover - torch < 2.9
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled
    return {"cuda_matmul": mode, "cudnn": mode}


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bfloat16 autocast around forward and loss for bf16; nothing otherwise."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def prepare(model: nn.Module, cfg: TrainConfig, device: torch.device) -> nn.Module:
    """Move `model` to the device in the configured layout and set the TF32 switches; returns what
    to call, which is `torch.compile(model)` when compiling. Weights stay in `model` either way
    (the compiled wrapper's state_dict keys carry an `_orig_mod.` prefix).

    Compiling first resets dynamo: a reused worker keeps the graphs of earlier runs' models, and
    once a code object reaches dynamo's recompile limit it silently runs eagerly."""
    set_tf32(cfg.precision == "tf32")
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    if not cfg.compile:
        return model
    torch._dynamo.reset()
    return torch.compile(model)


def layout(xb: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    """A batch (B, C, H, W) in the configured memory format."""
    return xb.contiguous(memory_format=torch.channels_last) if cfg.channels_last else xb


def make_batch(x: torch.Tensor, idx: torch.Tensor, cfg: TrainConfig, aug: torch.Generator) -> torch.Tensor:
    """Examples `idx` of x (B, C, H, W), augmented on the device, in the configured memory format."""
    return layout(x[idx] if cfg.augmentation == "none" else augment(x[idx], cfg.augmentation, aug), cfg)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, xb: torch.Tensor, yb: torch.Tensor,
               cfg: TrainConfig) -> torch.Tensor:
    """One optimiser step; returns the batch's mean loss, detached, still on the device (no sync)."""
    with autocast(cfg.precision, xb.device):
        loss = F.cross_entropy(model(xb), yb)  # autocast runs cross_entropy in fp32
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def memory_batches(x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, order: torch.Generator,
                   aug: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of (inputs, labels) batches of tensors on the device, in the order generator's permutation."""
    perm = torch.randperm(len(x), generator=order).to(x.device)
    for i in range(0, len(x), cfg.batch_size):
        idx = perm[i:i + cfg.batch_size]
        yield make_batch(x, idx, cfg, aug), y[idx]


def folder_batches(data: ImageFolders, cfg: TrainConfig, order: torch.Generator, aug: torch.Generator,
                   device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of batches decoded from files by `data.num_workers` DataLoader processes.

    The sampler is the order generator's permutation, each index paired with a seed from the
    augment generator that alone draws that example's crop and flip (DecodedImages): the batches
    are the same bits for any number of workers, and no worker RNG needs seeding. The loader gets
    its own generator, so creating its iterator does not draw from the global RNG (dropout's).
    """
    perm = torch.randperm(len(data.train), generator=order)
    seeds = torch.randint(2**62, (len(perm),), generator=aug, device=aug.device).cpu()  # one sync per epoch
    loader = DataLoader(DecodedImages(data.train, data.image_size, cfg.augmentation), batch_size=cfg.batch_size,
                        sampler=list(zip(perm.tolist(), seeds.tolist())), num_workers=data.num_workers,
                        pin_memory=device.type == "cuda", generator=torch.Generator())
    for xb, yb in loader:
        yield layout(xb.to(device, non_blocking=True), cfg), yb.to(device, non_blocking=True)


def train_epoch(model: nn.Module, opt: torch.optim.Optimizer, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                cfg: TrainConfig, device: torch.device) -> torch.Tensor:
    """One pass over `batches`; returns the summed loss on the device (no .item() per step: that
    would sync host and device every batch)."""
    model.train()
    total = torch.zeros((), device=device)
    for xb, yb in batches:
        total += train_step(model, opt, xb, yb, cfg) * len(yb)
    return total


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[torch.Tensor], y: torch.Tensor, num_classes: int,
             precision: str = "fp32") -> tuple[float, float, list[float], torch.Tensor]:
    """Accuracy, mean loss, per-class accuracy and arg-max predictions on the test inputs `batches`
    (in test-set order) and labels y, in the precision the model trained in."""
    model.eval()
    with autocast(precision, y.device):
        logits = torch.cat([model(xb) for xb in batches]).float()
    pred = logits.argmax(1)
    correct = (pred == y).double()
    per_class = torch.zeros(num_classes, dtype=torch.float64, device=y.device).index_add_(0, y, correct)
    counts = torch.bincount(y, minlength=num_classes).clamp_min(1)
    return (correct.mean().item(), F.cross_entropy(logits, y).item(),
            (per_class / counts).tolist(), pred.cpu())


def train(model: nn.Module, data: ArrayDataset | ImageFolders, cfg: TrainConfig, order: torch.Generator,
          aug: torch.Generator, device: torch.device) -> TrainResult:
    """Train `model` on `data` and evaluate it. `order` is a CPU generator (randperm), `aug` lives
    on `device`. Raises Diverged when an epoch's loss is not finite."""
    net = prepare(model, cfg, device)
    if isinstance(data, ImageFolders):
        batches = functools.partial(folder_batches, data, cfg, order, aug, device)  # a fresh epoch per call
        test = DataLoader(DecodedImages(data.test, data.image_size), batch_size=cfg.batch_size,
                          num_workers=data.num_workers)
        test_x = (layout(xb.to(device), cfg) for xb, _ in test)
    else:
        x, y = layout(data.train_x.to(device), cfg), data.train_y.to(device)
        batches = functools.partial(memory_batches, x, y, cfg, order, aug)
        test_x = data.test_x.to(device).split(1024)
    opt = make_optimizer(model, cfg)
    epoch_seconds = []
    for epoch in range(cfg.epochs):
        sync(device)
        t0 = time.perf_counter()
        loss = train_epoch(net, opt, batches(), cfg, device)
        sync(device)
        epoch_seconds.append(time.perf_counter() - t0)
        if not torch.isfinite(loss):  # one host-device sync per epoch, outside the timer
            raise Diverged(f"diverged at epoch {epoch + 1}")
    acc, test_loss, per_class, pred = evaluate(net, test_x, data.test_y.to(device), data.num_classes,
                                               precision=cfg.precision)
    return TrainResult(epoch_seconds, acc, test_loss, per_class, pred,
                       {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()})


@dataclass(frozen=True)
class Rank:
    """This process's place in a data-parallel replica. With world_size > 1, torch.distributed is
    already set up (by Ray Train) when training starts; rank 0 evaluates and reports."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0  # index among the ranks on this node
    device: torch.device | None = None  # the device Ray Train gave this rank; None: the run's own choice


SOLO = Rank()


def shard(indices: torch.Tensor, rank: Rank) -> torch.Tensor:
    """This rank's share of `indices` (an epoch's permutation): every world_size-th entry from
    `rank.rank` on, after leaving out the last len % world_size entries so that every rank takes
    the same number of equal steps (as DistributedSampler(drop_last=True)). Batch j of size B/k of
    the shard holds exactly rank r's part of global batch j of size B, so with the gradients
    averaged over the ranks (DDP) each step is the step of batch B at world size 1: only the
    distribution differs. At world size 1 it returns `indices` whole."""
    usable = len(indices) - len(indices) % rank.world_size
    return indices[:usable][rank.rank::rank.world_size]
