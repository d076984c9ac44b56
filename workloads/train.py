"""The training loop: the whole dataset on the device, batches and augmentation drawn from the
run's own generators, no DataLoader.

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


def make_batch(x: torch.Tensor, idx: torch.Tensor, cfg: TrainConfig, aug: torch.Generator) -> torch.Tensor:
    """Examples `idx` of x (B, C, H, W), augmented on the device, in the configured memory format."""
    xb = x[idx] if cfg.augmentation == "none" else augment(x[idx], cfg.augmentation, aug)
    return xb.contiguous(memory_format=torch.channels_last) if cfg.channels_last else xb


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


def train_epoch(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                cfg: TrainConfig, order: torch.Generator, aug: torch.Generator) -> torch.Tensor:
    """One pass in the order generator's permutation; returns the summed loss on the device
    (no .item() per step: that would sync host and device every batch)."""
    model.train()
    perm = torch.randperm(len(x), generator=order).to(x.device)
    total = torch.zeros((), device=x.device)
    for i in range(0, len(x), cfg.batch_size):
        idx = perm[i:i + cfg.batch_size]
        total += train_step(model, opt, make_batch(x, idx, cfg, aug), y[idx], cfg) * len(idx)
    return total


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int,
             batch_size: int = 1024, precision: str = "fp32") -> tuple[float, float, list[float], torch.Tensor]:
    """Accuracy, mean loss, per-class accuracy and arg-max predictions on (x, y), in the precision
    the model trained in."""
    model.eval()
    with autocast(precision, x.device):
        logits = torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]).float()
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
    net = prepare(model, cfg, device)
    x, y = data.train_x.to(device), data.train_y.to(device)
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    opt = make_optimizer(model, cfg)
    epoch_seconds = []
    for epoch in range(cfg.epochs):
        sync(device)
        t0 = time.perf_counter()
        loss = train_epoch(net, opt, x, y, cfg, order, aug)
        sync(device)
        epoch_seconds.append(time.perf_counter() - t0)
        if not torch.isfinite(loss):  # one host-device sync per epoch, outside the timer
            raise Diverged(f"diverged at epoch {epoch + 1}")
    acc, test_loss, per_class, pred = evaluate(net, data.test_x.to(device), data.test_y.to(device),
                                               data.num_classes, precision=cfg.precision)
    return TrainResult(epoch_seconds, acc, test_loss, per_class, pred,
                       {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()})
