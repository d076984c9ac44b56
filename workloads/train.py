"""The training loop: the whole dataset on the device, batches and augmentation drawn from the
run's own generators, no DataLoader; or, for image folders too large for memory, a DataLoader
whose sampler hands each example a seed drawn from the run's generators (`folder_batches`).

Three generators, one per algorithmic noise source: `order` shuffles, `augment` draws crops and
flips (the runner also seeds the global RNG, which dropout uses, with a seed derived from the
augment seed: controlled by the augment source, yet a stream apart from the augment generator's).
Initialisation happened before this loop, from the `init` source. So each source can be held
fixed or varied on its own.

Tooling options change bits without being random: `precision` (fp32 | tf32 | bf16 autocast),
`channels_last` (NHWC model and batches), `compile` (torch.compile), the attention kernel
(`sdpa_backend`, entered by the caller around training) and the evaluation batch size
(`eval_batch_size`). `train_step` is the one optimiser step both the training loop and the
determinism-overhead probe time.

Images and token windows go through the same code: a model maps (B, ...) inputs to (B, C) logits
(images) or (B, T, V) next-token logits (tokens), and every loss and metric flattens the logits to
rows and the targets alike, dropping targets equal to `IGNORE` (positions not trained on or not
evaluated).
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import sdpa_kernel
from torch.utils.data import DataLoader

from workloads.data import IGNORE, ArrayDataset, DecodedImages, ImageFolders, TokenDataset
from workloads.models import SDPA_BACKENDS, attention_backend


class Diverged(RuntimeError):
    """The loss became NaN or inf: the run stops and is recorded failed, not silently kept."""


@dataclass(frozen=True)
class TrainConfig:
    epochs: int
    batch_size: int
    lr: float  # peak learning rate of the schedule
    optimizer: str = "sgd"  # sgd | adam | adamw (decoupled weight decay)
    momentum: float = 0.9  # sgd only
    weight_decay: float = 0.0
    schedule: str = "constant"  # constant | cosine (to 0) | onecycle (torch's OneCycleLR); stepped per optimiser step
    warmup_epochs: float = 0.0  # linear warm-up from lr / steps for constant and cosine
    grad_clip: float | None = None  # max global L2 norm of the gradients; None: no clipping
    augmentation: str = "none"  # none | crop | flip | crop+flip
    precision: str = "fp32"  # fp32 (IEEE, TF32 off) | tf32 (TF32 matmul+conv on CUDA) | bf16 (autocast)
    channels_last: bool = False  # NHWC memory format for model and image batches
    compile: bool = False  # torch.compile the model (its first steps compile)
    eval_batch_size: int | None = None  # examples (windows) per evaluation batch; None: batch_size


@dataclass
class TrainResult:
    epoch_seconds: list[float]
    test_accuracy: float
    test_loss: float
    per_class_accuracy: list[float]
    predictions: torch.Tensor  # (N_test,) int64, dataset order (tokens: evaluation positions), on the CPU
    state_dict: dict[str, torch.Tensor]  # final weights, on the CPU, contiguous (also after channels_last)
    # built-in loop only (a user's function returns neither; both stay None):
    epoch_lr: list[float] | None = None  # learning rate of each epoch's first optimiser step
    attention_backend: str | None = None  # SDPA kernel of the first attention call (models.attention_backend)
    epoch_loss: list[float] | None = None  # mean training loss per example of each epoch


@dataclass(frozen=True)
class Rank:
    """This process's place in a data-parallel replica. With world_size > 1, torch.distributed is
    already set up (by the replica's group of processes) when training starts; rank 0 evaluates and reports."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0  # index among the ranks on this node


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


def prepare(model: nn.Module, cfg: TrainConfig, device: torch.device, rank: Rank = SOLO) -> nn.Module:
    """Move `model` to the device in the configured layout and set the TF32 switches; returns what
    to call: `model`, wrapped in DistributedDataParallel at world size > 1 (it broadcasts rank 0's
    weights and buffers and averages the gradients over the ranks), under `torch.compile` when
    compiling. Weights stay in `model` either way (the wrappers' state_dict keys carry a prefix).

    Compiling first resets dynamo: a reused worker keeps the graphs of earlier runs' models, and
    once a code object reaches dynamo's recompile limit it silently runs eagerly."""
    set_tf32(cfg.precision == "tf32")
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    net = model if rank.world_size == 1 else nn.parallel.DistributedDataParallel(
        model, device_ids=[device] if device.type == "cuda" else None)
    if not cfg.compile:
        return net
    torch._dynamo.reset()
    return torch.compile(net)


def layout(xb: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    """An image batch (B, C, H, W) in the configured memory format; token batches (B, T) have no
    channels and pass unchanged."""
    return xb.contiguous(memory_format=torch.channels_last) if cfg.channels_last and xb.dim() == 4 else xb


def make_batch(x: torch.Tensor, idx: torch.Tensor, cfg: TrainConfig, aug: torch.Generator) -> torch.Tensor:
    """Examples `idx` of x (B, C, H, W), augmented on the device, in the configured memory format."""
    return layout(x[idx] if cfg.augmentation == "none" else augment(x[idx], cfg.augmentation, aug), cfg)


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the targets that are not IGNORE. logits (B, C) with targets (B,), or
    (B, T, V) with (B, T): flattened to rows either way (for images a no-op)."""
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten(), ignore_index=IGNORE)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, xb: torch.Tensor, yb: torch.Tensor,
               cfg: TrainConfig) -> torch.Tensor:
    """One optimiser step, gradients clipped to `cfg.grad_clip` (global L2 norm, computed on the
    device: no sync); returns the batch's mean loss, detached, still on the device (no sync)."""
    with autocast(cfg.precision, xb.device):
        loss = loss_fn(model(xb), yb)  # autocast runs cross_entropy in fp32
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip is not None:
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    return loss.detach()


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak lr at optimiser step `step` (0-based) of `total`: linear warm-up
    (step + 1) / warmup for the first `warmup` steps, then 1 (constant) or a half cosine from 1
    down to 0 at step `total` (cosine)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def make_schedule(opt: torch.optim.Optimizer, cfg: TrainConfig,
                  steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
    """The learning-rate schedule, stepped once per optimiser step. `onecycle` is torch's
    OneCycleLR as users call it (peak `lr`, its own warm-up over the first 30% of steps, and it
    cycles SGD's momentum / Adam's beta1 too); the others are `lr_factor`. The lr is a Python float
    on the host: changing it costs no device work and no sync."""
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total)
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(opt, functools.partial(lr_factor, total=total, warmup=warmup,
                                                                    schedule=cfg.schedule))


def memory_batches(x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, order: torch.Generator,
                   aug: torch.Generator, rank: Rank = SOLO) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of (inputs, labels) batches of tensors on the device, in the order generator's
    permutation: at world size k, this rank's share of it (`shard`) in batches of batch_size / k."""
    perm = shard(torch.randperm(len(x), generator=order), rank).to(x.device)
    size = cfg.batch_size // rank.world_size
    for i in range(0, len(perm), size):
        idx = perm[i:i + size]
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


def train_epoch(model: nn.Module, opt: torch.optim.Optimizer, schedule: torch.optim.lr_scheduler.LRScheduler,
                batches: Iterable[tuple[torch.Tensor, torch.Tensor]], cfg: TrainConfig,
                device: torch.device) -> torch.Tensor:
    """One pass over `batches`, the schedule stepped after every optimiser step; returns the mean
    loss per example, a 0-d tensor on the device (no .item() per step: that would sync host and
    device every batch; the example count is the host's own)."""
    model.train()
    total, seen = torch.zeros((), device=device), 0
    for xb, yb in batches:
        total += train_step(model, opt, xb, yb, cfg) * len(yb)
        seen += len(yb)
        schedule.step()
    return total / max(seen, 1)


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], num_classes: int,
             device: torch.device, precision: str = "fp32") -> tuple[float, float, list[float], torch.Tensor]:
    """Accuracy, mean loss, per-class accuracy and arg-max predictions over the test batches of
    (inputs, targets) in test-set order, in the precision the model trained in. Targets are labels
    (B,) or next tokens (B, T); positions whose target is IGNORE are not evaluated, so predictions
    are one per test image, or one per evaluation position. The masking syncs once per batch:
    evaluation only, never in the training loop."""
    model.eval()
    rows, targets = [], []
    with autocast(precision, device):
        for xb, tb in batches:
            keep = tb.flatten() != IGNORE
            rows.append(model(xb).flatten(0, -2)[keep].float())  # (K_batch, C)
            targets.append(tb.flatten()[keep])
    logits, y = torch.cat(rows), torch.cat(targets)
    pred = logits.argmax(1)
    correct = (pred == y).double()
    per_class = torch.zeros(num_classes, dtype=torch.float64, device=y.device).index_add_(0, y, correct)
    counts = torch.bincount(y, minlength=num_classes).clamp_min(1)
    return (correct.mean().item(), F.cross_entropy(logits, y).item(),
            (per_class / counts).tolist(), pred.cpu())


def eval_batches(data: ArrayDataset | ImageFolders | TokenDataset, cfg: TrainConfig,
                 device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The test set as (inputs, targets) batches of `cfg.eval_batch_size` (default: the training
    batch size) examples or windows, in test-set order: the same weights give other bits at another
    evaluation batch size wherever a kernel is not batch-invariant."""
    size = cfg.eval_batch_size or cfg.batch_size
    if isinstance(data, ImageFolders):
        test = DataLoader(DecodedImages(data.test, data.image_size), batch_size=size, num_workers=data.num_workers)
        return ((layout(xb.to(device), cfg), yb.to(device)) for xb, yb in test)
    targets = data.test_targets if isinstance(data, TokenDataset) else data.test_y
    return zip((layout(xb, cfg) for xb in data.test_x.to(device).split(size)), targets.to(device).split(size))


def train(model: nn.Module, data: ArrayDataset | ImageFolders | TokenDataset, cfg: TrainConfig,
          order: torch.Generator, aug: torch.Generator, device: torch.device,
          rank: Rank = SOLO, on_epoch: Callable[[nn.Module], None] | None = None) -> TrainResult | None:
    """Train `model` on `data` and evaluate it. `order` is a CPU generator (randperm), `aug` lives
    on `device`. Raises Diverged when an epoch's loss is not finite. The attention kernel is the
    caller's: `with sdpa_backend(name, device): train(...)`. At world size > 1 every rank trains
    its share of each global batch and rank 0 alone evaluates; other ranks return None. (Each
    rank's loss is the mean over its share: token batches whose ranks hold unequal numbers of
    trained positions weigh those positions a little unequally, as any DDP loop does.)
    `on_epoch(model)` runs on rank 0 after each epoch, outside the epoch's timer (the runner's
    per-epoch weights digest and sketch)."""
    net = prepare(model, cfg, device, rank)
    if isinstance(data, ImageFolders):  # one process only (the spec refuses world_size > 1 for them)
        batches = functools.partial(folder_batches, data, cfg, order, aug, device)  # a fresh epoch per call
        n_train = len(data.train)
    else:
        x, y = layout(data.train_x.to(device), cfg), data.train_y.to(device)
        batches = functools.partial(memory_batches, x, y, cfg, order, aug, rank)
        n_train = len(x) - len(x) % rank.world_size
    opt = make_optimizer(model, cfg)
    schedule = make_schedule(opt, cfg, steps_per_epoch=-(-n_train // cfg.batch_size))
    epoch_seconds, epoch_lr, epoch_loss = [], [], []
    for epoch in range(cfg.epochs):
        epoch_lr.append(opt.param_groups[0]["lr"])
        sync(device)
        t0 = time.perf_counter()
        loss = train_epoch(net, opt, schedule, batches(), cfg, device)
        sync(device)
        epoch_seconds.append(time.perf_counter() - t0)
        epoch_loss.append(loss.item())  # one host-device sync per epoch, outside the timer
        if not math.isfinite(epoch_loss[-1]):
            raise Diverged(f"diverged at epoch {epoch + 1}")
        if on_epoch is not None and rank.rank == 0:
            on_epoch(model)
    if rank.rank != 0:
        return None
    # DDP's forward is a collective (it broadcasts buffers): rank 0 evaluates the module itself
    acc, test_loss, per_class, pred = evaluate(net if rank.world_size == 1 else model, eval_batches(data, cfg, device),
                                               data.num_classes, device, precision=cfg.precision)
    return TrainResult(epoch_seconds, acc, test_loss, per_class, pred,
                       {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                       epoch_lr, attention_backend(model), epoch_loss)


# --- the attention kernel -------------------------------------------------------------------------

class AttentionUnavailable(RuntimeError):
    """The attention kernel a run asked for is not offered on its device (or not for its inputs)."""


def describe(device: torch.device) -> str:
    """A device as an error message names it: `cpu (AVX512)`, `cuda:0 (NVIDIA A100-SXM4-40GB)`."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        return f"cpu ({torch.backends.cpu.get_cpu_capability()})"
    return str(device)


def _no_kernel(error: RuntimeError) -> bool:
    """torch's errors for "no enabled SDPA kernel takes these inputs" (CPU and CUDA word it apart)."""
    return any(m in str(error) for m in ("No available kernel", "No viable backend for scaled_dot_product_attention"))


def offered_backends(device: torch.device) -> list[str]:
    """The SDPA kernels `device` offers at all, asked the way SDPA asks (`torch._fused_sdp_choice`)
    for the friendliest inputs: a causal (1, 1, 16, 64) attention in fp16 on a GPU (flash and cuDNN
    take no fp32), fp32 elsewhere. A kernel offered here may still refuse a run's real inputs
    (dtype, head size): `sdpa_backend` then fails at the first attention call."""
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    q = torch.zeros(1, 1, 16, 64, device=device, dtype=dtype)
    offered = []
    for name, backend in SDPA_BACKENDS.items():
        # a kernel not offered raises, after a warning per reason (quiet here: the caller says it in one line)
        with sdpa_kernel(backend), contextlib.suppress(RuntimeError), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if torch._fused_sdp_choice(q, q, q, None, 0.0, True) == backend.value:
                offered.append(name)
    return offered


@contextlib.contextmanager
def sdpa_backend(name: str, device: torch.device) -> Iterator[None]:
    """Restrict `F.scaled_dot_product_attention` to one kernel (`math | flash | efficient | cudnn`)
    for the code run inside; `auto` leaves torch its own choice. Entering with a kernel `device`
    does not offer raises AttentionUnavailable at once; a kernel offered that refuses the real
    inputs (e.g. flash with fp32 on a GPU) raises it at the first attention call. Both messages are
    one line naming the kernel and the device. Wraps the built-in loop and a user's function alike."""
    if name == "auto":
        yield
        return
    offered = offered_backends(device)
    if name not in offered:
        raise AttentionUnavailable(f"attention: the {name} kernel is not available on {describe(device)}; "
                                   f"available there: {', '.join(offered) or 'none'}")
    with sdpa_kernel(SDPA_BACKENDS[name]):
        try:
            yield
        except RuntimeError as e:
            if not _no_kernel(e):
                raise
            raise AttentionUnavailable(f"attention: the {name} kernel does not take this run's inputs on "
                                       f"{describe(device)} (dtype, head size or mask; torch's warnings say which); "
                                       "choose another attention backend") from None
