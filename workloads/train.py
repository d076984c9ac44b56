"""The training loop: the whole dataset on the device, batches and augmentation drawn from the
run's own generators, no DataLoader.

Three generators, one per algorithmic noise source: `order` shuffles, `augment` draws crops and
flips (the runner also seeds the global RNG, which dropout uses, from the augment source).
Initialisation happened before this loop, from the `init` source. So each source can be held
fixed or varied on its own.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from workloads.data import ArrayDataset


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


@dataclass
class TrainResult:
    epoch_seconds: list[float]
    test_accuracy: float
    test_loss: float
    per_class_accuracy: list[float]
    predictions: torch.Tensor  # (N_test,) int64, dataset order, on the CPU
    state_dict: dict[str, torch.Tensor]  # final weights, on the CPU


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


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def train_epoch(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                cfg: TrainConfig, order: torch.Generator, aug: torch.Generator) -> torch.Tensor:
    """One pass in the order generator's permutation; returns the summed loss on the device
    (no .item() per step: that would sync host and device every batch)."""
    model.train()
    perm = torch.randperm(len(x), generator=order).to(x.device)
    total = torch.zeros((), device=x.device)
    for i in range(0, len(x), cfg.batch_size):
        idx = perm[i:i + cfg.batch_size]
        xb = x[idx] if cfg.augmentation == "none" else augment(x[idx], cfg.augmentation, aug)
        loss = F.cross_entropy(model(xb), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += loss.detach() * len(idx)
    return total


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int,
             batch_size: int = 1024) -> tuple[float, float, list[float], torch.Tensor]:
    """Accuracy, mean loss, per-class accuracy and arg-max predictions on (x, y)."""
    model.eval()
    logits = torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
    pred = logits.argmax(1)
    correct = (pred == y).double()
    per_class = torch.zeros(num_classes, dtype=torch.float64, device=y.device).index_add_(0, y, correct)
    counts = torch.bincount(y, minlength=num_classes).clamp_min(1)
    return (correct.mean().item(), F.cross_entropy(logits, y).item(),
            (per_class / counts).tolist(), pred.cpu())


def train(model: nn.Module, data: ArrayDataset, cfg: TrainConfig, order: torch.Generator,
          aug: torch.Generator, device: torch.device) -> TrainResult:
    """Train `model` on `data` and evaluate it. `order` is a CPU generator (randperm), `aug` lives
    on `device`. Raises Diverged when an epoch's loss is not finite."""
    model.to(device)
    x, y = data.train_x.to(device), data.train_y.to(device)
    opt = make_optimizer(model, cfg)
    epoch_seconds = []
    for epoch in range(cfg.epochs):
        sync(device)
        t0 = time.perf_counter()
        loss = train_epoch(model, opt, x, y, cfg, order, aug)
        sync(device)
        epoch_seconds.append(time.perf_counter() - t0)
        if not torch.isfinite(loss):  # one host-device sync per epoch, outside the timer
            raise Diverged(f"diverged at epoch {epoch + 1}")
    acc, test_loss, per_class, pred = evaluate(model, data.test_x.to(device), data.test_y.to(device),
                                               data.num_classes)
    return TrainResult(epoch_seconds, acc, test_loss, per_class, pred,
                       {k: v.detach().cpu() for k, v in model.state_dict().items()})
