"""Adapters from a run's `ctx` to a framework's own trainer (Hugging Face `Trainer`, Lightning), so
that a script written for the framework runs as a replica with each noise source kept apart.

Both frameworks seed and switch determinism process-wide (environment variables, torch's global
switches). A worker runs many replicas in one process, so what a framework changes there would leak
into the next run: `contained` records the watched globals before the framework runs, restores
them after, and writes what changed into the row's `note` (`ctx.note`), so it is reported, not hidden.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

# Process-wide settings the frameworks are known to write (transformers.enable_full_determinism,
# lightning's seed_everything and Trainer(deterministic=...)).
WATCHED_ENV = ("CUBLAS_WORKSPACE_CONFIG", "CUDA_LAUNCH_BLOCKING", "FLASH_ATTENTION_DETERMINISTIC",
               "HCCL_DETERMINISTIC", "ASCEND_LAUNCH_BLOCKING", "PL_GLOBAL_SEED", "PL_SEED_WORKERS")


def _switches() -> dict[str, object]:
    """torch's process-wide switches that decide kernels (and so bits)."""
    return {"use_deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "deterministic_warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
            "cudnn.deterministic": torch.backends.cudnn.deterministic,
            "cudnn.benchmark": torch.backends.cudnn.benchmark, "num_threads": torch.get_num_threads()}


def snapshot() -> dict[str, object]:
    return {**{k: os.environ.get(k) for k in WATCHED_ENV}, **_switches()}


def restore(saved: dict[str, object]) -> None:
    for k in WATCHED_ENV:
        if saved[k] is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = saved[k]
    torch.use_deterministic_algorithms(saved["use_deterministic_algorithms"],
                                       warn_only=saved["deterministic_warn_only"])
    torch.backends.cudnn.deterministic = saved["cudnn.deterministic"]
    torch.backends.cudnn.benchmark = saved["cudnn.benchmark"]
    torch.set_num_threads(saved["num_threads"])


def changes(before: dict[str, object], after: dict[str, object]) -> list[str]:
    """`name: old -> new` for each watched global that differs."""
    return [f"{k}: {before[k]} -> {after[k]}" for k in before if before[k] != after[k]]


@contextmanager
def contained(ctx, framework: str) -> Iterator[None]:
    """Run the framework's code, then note what it changed process-wide and put it back: the run's
    own switches were set by the harness from its preset, and the next replica in this worker must
    start from them, not from what this framework left."""
    before = snapshot()
    try:
        yield
    finally:
        changed = changes(before, snapshot())
        if changed:
            ctx.note(f"{framework} set process-wide ({'; '.join(changed)}); restored after the run")
        restore(before)


def override(ctx, framework: str, given: dict, wanted: dict) -> dict:
    """`given` with `wanted` put over it, noting each value the script chose that the run replaces
    (a script's own `seed=42` would tie every replica's sources to one number; its batch is split
    over the ranks at world size > 1)."""
    for k, v in wanted.items():
        if k in given and given[k] != v:
            ctx.note(f"{framework}: the script's {k}={given[k]!r} replaced by {v!r} from the run's preset and tooling")
    return given | wanted
