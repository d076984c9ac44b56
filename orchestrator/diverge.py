"""Where two settings part: a trace of every aten op's outputs, and the first op where two traces differ.

Every table says *that* two settings differ; this module says *where*: which step, which phase
(forward, backward, optimizer), which module, which aten op. `Tracer` is a `TorchDispatchMode`
that records, for each aten op, its outputs' shape, dtype, a digest of their bytes and a small
numeric summary (L2 norm, max |x|), with the module path from `ModuleTracker` and the phase from
the tracker's backward flag and the optimizers' global step hooks (so a user's own loop is traced
as the built-in one is: nothing to call from inside the loop). `first_parting` aligns two traces:
a plain zip where the op sequences agree, and, where they do not (math vs flash attention run
different ops), a sequence alignment keyed by (step, phase, module, op), so that the ops after
the differing block are compared with their counterparts and not with whatever sits at the same index.

No Ray here: a GPU box runs this without Ray installed.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.module_tracker import ModuleTracker

MAX_OPS = 50_000  # a cap on the ops recorded: a trace is for the first steps, not a whole run
# ops whose outputs are uninitialised memory: recorded (the op sequence counts) without a digest
UNINITIALISED = frozenset({"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"})


@dataclass(frozen=True)
class OpRecord:
    """One output of one aten op."""

    index: int  # position in the trace
    step: int  # optimiser steps completed before this op
    phase: str  # forward | backward | optimizer
    module: str  # innermost module path ("Global" outside any module)
    op: str  # e.g. aten.convolution.default
    shape: str
    dtype: str
    digest: str  # blake2b of the output's bytes (dense, contiguous, on the CPU)
    norm: float  # L2 norm in float64 (a difference's size is measured against it)
    max_abs: float

    def key(self) -> tuple:
        """What must match for two records to be counterparts (everything but the values)."""
        return (self.step, self.phase, self.module, self.op)


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The bytes a digest is taken of: the values in logical (row-major) order, so that two tensors
    equal element by element but laid out differently (channels_last, a transposed view) have the
    same digest. A sparse tensor is made dense first: its digest is that of its values, not of its
    index layout."""
    t = t.detach()
    if t.layout != torch.strided:
        t = t.to_dense()
    return t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def summarise(t: torch.Tensor) -> tuple[float, float]:
    """L2 norm and max |x| of t in float64 (0 for an empty tensor)."""
    if t.numel() == 0 or t.dtype == torch.bool:
        return 0.0, 0.0
    x = t.detach()
    if x.layout != torch.strided:
        x = x.to_dense()
    x = x.to(torch.complex128 if x.is_complex() else torch.float64).abs()
    return float(x.norm()), float(x.max())


def innermost(parents: set[str]) -> str:
    """The deepest module path among ModuleTracker's parents (the one the op runs in)."""
    return max(parents, key=lambda p: (p != "Global", p.count("."), len(p)))


class Tracer(TorchDispatchMode):
    """Records every aten op's tensor outputs while active (up to `max_ops` records). Use as
    `with Tracer() as t: ...; t.records`. The step counter advances after each optimiser step."""

    def __init__(self, max_ops: int = MAX_OPS):
        super().__init__()
        self.max_ops = max_ops
        self.records: list[OpRecord] = []
        self.truncated = False
        self.step = 0
        self._in_optimizer = False
        self._modules = ModuleTracker()
        self._stack = contextlib.ExitStack()

    def __enter__(self):
        def pre(*_):
            self._in_optimizer = True

        def post(*_):
            self._in_optimizer = False
            self.step += 1

        self._stack.enter_context(self._modules)
        self._stack.callback(register_optimizer_step_pre_hook(pre).remove)
        self._stack.callback(register_optimizer_step_post_hook(post).remove)
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._stack.close()

    def phase(self) -> str:
        if self._in_optimizer:
            return "optimizer"
        return "backward" if self._modules.is_bw else "forward"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if len(self.records) >= self.max_ops:
            self.truncated = True
            return out
        module, phase = innermost(self._modules.parents), self.phase()
        blank = func.overloadpacket.__name__ in UNINITIALISED
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and len(self.records) < self.max_ops:
                norm, max_abs = (0.0, 0.0) if blank else summarise(t)
                self.records.append(OpRecord(
                    index=len(self.records), step=self.step, phase=phase, module=module, op=str(func),
                    shape="x".join(map(str, t.shape)), dtype=str(t.dtype).removeprefix("torch."),
                    digest="" if blank else hashlib.blake2b(tensor_bytes(t), digest_size=16).hexdigest(),
                    norm=norm, max_abs=max_abs))
        return out


def trace(fn: Callable[[], object], max_ops: int = MAX_OPS) -> list[OpRecord]:
    """The trace of `fn()` (typically: a model's first optimiser steps)."""
    with Tracer(max_ops) as t:
        fn()
    return t.records


@dataclass(frozen=True)
class Parting:
    """Where two traces part; `op is None` when they do not (identical over `ops` aligned ops)."""

    ops: int  # ops of trace a compared
    index_a: int | None = None
    index_b: int | None = None
    step: int | None = None
    phase: str | None = None
    module: str | None = None
    op: str | None = None  # "aten.x" or "aten.x | aten.y" where the op sequences differ
    same_ops: bool = True  # False: the two settings run different ops here
    rel_size: float | None = None  # |norm_a - norm_b| / norm_a at the first differing output of the same shape
    later_differing: int = 0  # aligned ops after the parting that differ too (values or op)

    def describe(self) -> str:
        if self.op is None:
            return f"identical over {self.ops} ops"
        size = "" if self.rel_size is None else f", relative size {self.rel_size:.3g}"
        kind = "" if self.same_ops else " (different op sequences)"
        return (f"part at op {self.index_a} (step {self.step}, {self.phase}, {self.module}: {self.op}{kind}"
                f"{size}); {self.later_differing} later ops differ")

    def row(self) -> dict:
        return {**asdict(self), "summary": self.describe()}


def rel_size(a: OpRecord, b: OpRecord) -> float | None:
    """A lower bound of ||a - b|| / ||a|| from the two norms (the trace keeps no values)."""
    if a.shape != b.shape:
        return None
    return abs(a.norm - b.norm) / a.norm if a.norm else float(a.norm != b.norm)


def _aligned(a: Sequence[OpRecord], b: Sequence[OpRecord]) -> Iterator[tuple[OpRecord | None, OpRecord | None]]:
    """Pairs of counterpart records: a zip while the keys agree, then a sequence alignment on
    the keys of the rest (None on the side that has no counterpart)."""
    n = 0
    while n < min(len(a), len(b)) and a[n].key() == b[n].key():
        yield a[n], b[n]
        n += 1
    rest_a, rest_b = a[n:], b[n:]
    matcher = difflib.SequenceMatcher(None, [r.key() for r in rest_a], [r.key() for r in rest_b], autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            yield from zip(rest_a[i1:i2], rest_b[j1:j2])
            continue
        for k in range(max(i2 - i1, j2 - j1)):
            yield (rest_a[i1 + k] if i1 + k < i2 else None), (rest_b[j1 + k] if j1 + k < j2 else None)


def first_parting(a: Sequence[OpRecord], b: Sequence[OpRecord]) -> Parting:
    """The first aligned pair whose op or output differs, how large the difference is and how many
    aligned pairs after it differ too."""
    first: tuple[OpRecord | None, OpRecord | None] | None = None
    size, later = None, 0
    for ra, rb in _aligned(a, b):
        differs = ra is None or rb is None or ra.key() != rb.key() or ra.digest != rb.digest
        if not differs:
            continue
        if first is None:
            first = (ra, rb)
        else:
            later += 1
        if size is None and ra is not None and rb is not None and ra.key() == rb.key():
            size = rel_size(ra, rb)
    if first is None:
        return Parting(ops=len(a))
    ra, rb = first
    at = ra or rb
    same = ra is not None and rb is not None and ra.op == rb.op
    op = at.op if same else f"{ra.op if ra else '-'} | {rb.op if rb else '-'}"
    return Parting(ops=len(a), index_a=ra.index if ra else None, index_b=rb.index if rb else None,
                   step=at.step, phase=at.phase, module=at.module, op=op, same_ops=same,
                   rel_size=size, later_differing=later)
