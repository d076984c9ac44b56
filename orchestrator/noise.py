"""The noise sources of a replica, their presets, seed derivation and determinism switches.

A source that *varies* gets a seed derived from (base seed, source, replica) by a stable hash,
so replica 3 of any sweep with the same base seed sees the same data order on any machine. A
*fixed* source derives its seed from (base seed, source) alone: identical in every replica, yet
init and order never share a stream.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, replace

SOURCES = ("init", "order", "augment", "impl", "bitflip")
ALGO = ("init", "order", "augment")

# Named as in the reference study; single-source presets isolate one algorithmic source.
PRESETS: dict[str, frozenset[str]] = {
    "control": frozenset(),
    "algo": frozenset(ALGO),
    "impl": frozenset({"impl"}),
    "algo+impl": frozenset({*ALGO, "impl"}),
    "init": frozenset({"init"}),
    "order": frozenset({"order"}),
    "augment": frozenset({"augment"}),
    # The instability control (Summers & Dinneen 2021): everything fixed but one bit of one initial weight.
    "bitflip": frozenset({"bitflip"}),
}

CUBLAS_WORKSPACE = ":4096:8"


def derive_seed(base_seed: int, source: str, replica: int | None = None) -> int:
    """A 63-bit seed from a stable hash (Python's hash() is salted per process, so never that)."""
    key = f"{base_seed}:{source}" if replica is None else f"{base_seed}:{source}:{replica}"
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") >> 1


@dataclass(frozen=True)
class Seeds:
    init: int
    order: int
    augment: int
    bitflip: int | None = None  # which initial weight gets its lowest bit flipped; None: no flip

    @property
    def global_rng(self) -> int:
        """Seed of torch's global RNG (dropout, stochastic depth): held fixed or varied with the
        augment source, yet a stream of its own, so that dropout masks never replay the crop and
        flip draws of the augment generator."""
        return derive_seed(self.augment, "global")

    def for_rank(self, rank: int) -> Seeds:
        """The seeds of data-parallel rank `rank`: init and order as the replica's (every rank starts
        from the same weights; the order source's permutation is split by rank), augment from
        (augment seed, rank), so ranks draw their own crops, flips and dropout masks. Rank 0 keeps
        the replica's, so that a world-size-1 run is the run it was before world sizes existed."""
        return self if rank == 0 else replace(self, augment=derive_seed(self.augment, "rank", rank))


def seeds_for(base_seed: int, vary: frozenset[str], replica: int) -> Seeds:
    """The seed each algorithmic source uses in this replica; a bit-flip seed only where it varies."""
    return Seeds(**{s: derive_seed(base_seed, s, replica if s in vary else None) for s in ALGO},
                 bitflip=derive_seed(base_seed, "bitflip", replica) if "bitflip" in vary else None)


def flip_lowest_bit(model, seed: int) -> str:
    """Flip the lowest mantissa bit of one floating-point parameter element, chosen uniformly over
    all of them by `seed`, in place; returns `name[flat index]` for the row. One ulp of one weight
    is the smallest change training can be given: whatever spread it causes is instability alone."""
    import torch

    params = [(n, p) for n, p in model.named_parameters() if p.is_floating_point() and p.numel()]
    sizes = torch.tensor([p.numel() for _, p in params])
    pick = int(torch.randint(int(sizes.sum()), (1,), generator=torch.Generator().manual_seed(seed)))
    k = int(torch.searchsorted(torch.cumsum(sizes, 0), pick, right=True))
    name, p = params[k]
    index = pick - int(sizes[:k].sum())
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[p.element_size()]
    with torch.no_grad():  # IEEE formats keep the mantissa in the low bits: xor 1 is one ulp
        p.view(-1)[index : index + 1].view(ints).bitwise_xor_(1)
    return f"{name}[{index}]"


def apply_impl(deterministic: bool, cudnn_benchmark: bool = False, compile: bool = False,
               warn_only: bool = False) -> dict[str, object]:
    """Set torch's kernel-selection switches and return exactly what was set.

    Must run before the model is built and before CUDA starts: cuBLAS reads
    CUBLAS_WORKSPACE_CONFIG once, when its handle is created. Ops with no deterministic kernel
    raise under `use_deterministic_algorithms(True)`; that is the point. `warn_only` makes them
    warn instead, which the overhead probe uses to record them by name and keep timing.

    `cudnn_benchmark` (cuDNN autotuning) is a tooling axis of its own, not part of `impl`: PyTorch's
    default is off whatever the determinism switches say. For compiled runs, inductor's own
    deterministic mode (no on-device benchmarking of generated kernels) follows `deterministic`;
    each compiled run sets it both ways, since a reused worker keeps the previous trial's value.
    """
    import torch

    if deterministic:
        if torch.cuda.is_initialized() and os.environ.get("CUBLAS_WORKSPACE_CONFIG") != CUBLAS_WORKSPACE:
            raise RuntimeError("CUDA started before CUBLAS_WORKSPACE_CONFIG was set; "
                               "apply_impl must run first in the worker")
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE
    elif not torch.cuda.is_initialized():  # framework default: cuBLAS picks its own workspaces
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = cudnn_benchmark
    flags = {
        "use_deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    }
    if compile:
        import torch._inductor.config as inductor  # imported only by compiled runs: ~1.5 s

        if hasattr(inductor, "deterministic"):  # torch >= 2.6
            inductor.deterministic = deterministic
            flags["inductor_deterministic"] = inductor.deterministic
    return flags
