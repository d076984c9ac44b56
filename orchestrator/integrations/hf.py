"""The Hugging Face `Trainer` under the harness: `training_arguments`, `trainer` and `fit_predict`
replace `TrainingArguments(...)`, `Trainer(...)` and the script's train/evaluate calls.

How each source stays apart (transformers >= 4.40, accelerate's seedable sampler):
- init: the harness seeds torch's global RNG from `init` before the function runs, so a model built
  before `trainer(...)` takes its weights from init; a `model_init` is called under the init seed too
  (the Trainer itself would call it right after `set_seed(args.seed)`, i.e. from augment).
- order: `data_seed` = the order seed (accelerate's SeedableRandomSampler: epoch + data_seed).
- augment: `seed` = the augment seed; the Trainer's `set_seed(seed)` reseeds torch, random and numpy,
  so dropout and the collator's masking draw from augment.
- impl: `full_determinism` = ctx.deterministic. Its process-wide side effects (CUBLAS_WORKSPACE_CONFIG,
  CUDA_LAUNCH_BLOCKING, ...) are noted in the row and undone after the run (`contained`).
- precision: `bf16` from ctx.precision (TF32 the harness already switched); threads and the SDPA
  kernel the harness set around the call (build the model with attn_implementation="sdpa").
- world size: at `world_size > 1` the Trainer trains DDP in the harness's ranks (accelerate finds
  them in the environment the harness exported and reuses its process group); the script's
  per-device batch, its global batch at world size 1, is split over the ranks.
A value the script passes for one of these is replaced and the row's note says so.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable

import numpy as np
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from orchestrator.integrations import contained, override

FRAMEWORK = "transformers"
QUIET = {"report_to": "none", "save_strategy": "no", "disable_tqdm": True, "logging_strategy": "epoch"}


def preset_arguments(ctx) -> dict:
    """The TrainingArguments fields the run's preset decides (seeds to 32 bits: numpy's limit)."""
    return {"seed": ctx.seed("augment") % 2**32, "data_seed": ctx.seed("order") % 2**32,
            "full_determinism": ctx.deterministic, "bf16": ctx.precision == "bf16", "use_cpu": ctx.device.type == "cpu"}


def rank_arguments(ctx, given: dict) -> dict:
    """At world size > 1: the script's per-device batch (its global batch at world size 1) split
    over the ranks, so the global batch stays; the harness's process group's backend. accelerate's
    PartialState finds the ranks in the environment the harness exported (RANK, WORLD_SIZE, ...)
    and reuses the group it set up."""
    if ctx.world_size == 1:
        return {}
    batch = given.get("per_device_train_batch_size", TrainingArguments.per_device_train_batch_size)
    return {"per_device_train_batch_size": ctx.per_rank(batch), "ddp_backend": torch.distributed.get_backend()}


def training_arguments(ctx, **kwargs) -> TrainingArguments:
    """`TrainingArguments(**kwargs)` with seeds, determinism, precision, device and ranks from `ctx`;
    logging, saving and progress bars off unless the script asks (the harness records the run)."""
    kwargs = override(ctx, FRAMEWORK, QUIET | kwargs, preset_arguments(ctx) | rank_arguments(ctx, kwargs))
    kwargs.setdefault("output_dir", os.path.join(tempfile.gettempdir(), "tooling-noise-hf", ctx.run_id))
    return TrainingArguments(**kwargs)


class _Report(TrainerCallback):
    """ctx.report once per epoch (its seconds are the epoch time) with the script's own
    `epoch_metrics()`, e.g. a digest of the batch order it saw. The Trainer logs the epoch's loss
    only after this callback, so the loss is in its own log, not here."""

    def __init__(self, ctx, epoch_metrics: Callable[[], dict] | None):
        self.ctx, self.epoch_metrics = ctx, epoch_metrics or dict

    def on_epoch_end(self, args, state, control, **kwargs):
        self.ctx.report(epoch=round(state.epoch), **self.epoch_metrics())


def _under_init_seed(ctx, model_init: Callable) -> Callable:
    def build(*args):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(ctx.seed("init"))
            return model_init(*args)
    return build


def trainer(ctx, epoch_metrics: Callable[[], dict] | None = None, **kwargs) -> Trainer:
    """`Trainer(**kwargs)` reporting each epoch to ctx; `args` default to `training_arguments(ctx)`."""
    kwargs.setdefault("args", training_arguments(ctx))
    if kwargs.get("model_init") is not None:
        kwargs["model_init"] = _under_init_seed(ctx, kwargs["model_init"])
    kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), _Report(ctx, epoch_metrics)]
    with contained(ctx, FRAMEWORK):
        return Trainer(**kwargs)


def fit_predict(ctx, trainer: Trainer, test_dataset) -> dict:
    """Train, then predict the test set with the Trainer's own `predict` (sequential, so the order
    is the dataset's; at world size > 1 accelerate shards the batches over the ranks and gathers
    them back in that order, the padding of the last one dropped): the harness's {predictions,
    labels, state_dict, test_loss}."""
    with contained(ctx, FRAMEWORK):
        trainer.train()
        out = trainer.predict(test_dataset)
    logits = out.predictions[0] if isinstance(out.predictions, tuple) else out.predictions
    return {"predictions": np.asarray(logits).argmax(-1), "labels": np.asarray(out.label_ids),
            "state_dict": trainer.model.state_dict(), "test_loss": out.metrics.get("test_loss")}
