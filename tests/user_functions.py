"""User training functions that break the entrypoint contract, referenced from sweep specs as
`entrypoint: tests.user_functions:<name>` (workers import this module through PYTHONPATH)."""

import torch


def raises(ctx):
    raise ValueError("no data here,\nlook elsewhere")


def wrong_length(ctx):
    return {"predictions": torch.zeros(9, dtype=torch.int64), "labels": torch.arange(10) % 2}


def no_labels(ctx):
    return {"predictions": torch.zeros(10, dtype=torch.int64)}


def settings_seen(ctx):
    """Returns, as 'predictions', what the function found in force when it was called: threads,
    deterministic kernels on, ctx.deterministic, and whether the global RNG starts at the init seed."""
    seen = [torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(), ctx.deterministic,
            torch.initial_seed() == ctx.seed("init")]
    return {"predictions": torch.tensor([int(v) for v in seen]), "labels": torch.zeros(4, dtype=torch.int64)}


def needs_size(ctx, size, scale=1.0):
    """Takes a required argument: a sweep that leaves `size` out of `args` is refused when checked."""
    raise AssertionError("never called: the sweep file check refuses it")


def ignores_order(ctx):
    """Draws its weights from the init source and never uses the order generator (as code that
    shuffles only on accelerators): replicas of preset `order` are bitwise identical."""
    w = torch.randn(4, generator=ctx.generator("init"))
    return {"predictions": (w > 0).long(), "labels": torch.tensor([0, 1, 0, 1]), "state_dict": {"w": w}}


def raises_on_rank_1(ctx):
    """A data-parallel function whose rank 1 fails; rank 0 would return a valid result."""
    if ctx.rank == 1:
        raise ValueError("rank one broke")
    return {"predictions": torch.zeros(4, dtype=torch.int64), "labels": torch.zeros(4, dtype=torch.int64)}


def raises_in_replica_0(ctx):
    """Every rank raises in replica 0 (a bug that hits all ranks alike); replica 1 trains."""
    if "-r0-" in ctx.run_id:
        raise ValueError("replica 0 fails on every rank")
    return {"predictions": torch.zeros(4, dtype=torch.int64), "labels": torch.zeros(4, dtype=torch.int64)}


def rank_1_dies_once(ctx, marker: str):
    """A data-parallel function whose rank 1 process is killed (SIGKILL, as the OOM killer does) the
    first time it runs; the retry finds the marker and trains."""
    import os
    import signal
    from pathlib import Path

    if ctx.rank == 1 and not Path(marker).exists():
        Path(marker).write_text(str(os.getpid()))  # which process died: tests see which group ran it
        os.kill(os.getpid(), signal.SIGKILL)
    return {"predictions": torch.zeros(4, dtype=torch.int64), "labels": torch.zeros(4, dtype=torch.int64)}


def takes_any_args(ctx, **args):
    """Accepts any `args` (the signature check lets **kwargs through); fails if ever run."""
    raise ValueError(f"not meant to run: {sorted(args)}")


def talks(ctx):
    """Prints as training code does: whole lines, a line in pieces, and to stderr."""
    import sys

    print("epoch 1 done")
    print("loss ", end="")
    print("0.5")
    print("warning: slow", file=sys.stderr)
    return settings_seen(ctx)
