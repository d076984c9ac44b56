"""Where two settings part: a trace of every aten op's outputs, and the first op where two traces differ.

    python -m orchestrator.diverge OUT --a KEY=VAL[,KEY=VAL] --b KEY=VAL[,KEY=VAL] [--steps N] [--max-ops N]

The sides are `compare`'s selectors over the runs of OUT/sweep.yaml (`run_id=...` names one run);
one run of each side with the same replica index (so the same seeds) is replayed for its first
N optimiser steps, each in a fresh interpreter with its stack's environment variables (they act
before torch imports), under its threads, precision, attention kernel and evaluation batch, through
the runner's one path (built-in loop and a user's entrypoint alike). Prints the first point where
the two traces part and writes OUT/tables/diverge.{md,csv,parquet}. Exit 0 written, 2 bad usage.

Every table says *that* two settings differ; this module says *where*: which step, which phase
(forward, backward, optimizer), which module, which aten op. `Tracer` is a `TorchDispatchMode`
that records, for each aten op, its outputs' shape, dtype, a digest of their bytes and a small
numeric summary (L2 norm, max |x|), with the module path from `ModuleTracker` and the phase from
the tracker's backward flag and the optimizers' global step hooks (so a user's own loop is traced
as the built-in one is: nothing to call from inside the loop). `first_parting` aligns two traces:
a plain zip where the op sequences agree, and, where they do not (math vs flash attention run
different ops), a sequence alignment keyed by (step, phase, module, op), so that the ops after
the differing block are compared with their counterparts and not with whatever sits at the same index.

No Ray and no pandas at import: the doctor traces with this on a GPU box that has neither; the
command's own parts (selecting runs, writing tables) import pandas when they run.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import hashlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.module_tracker import ModuleTracker

from orchestrator import runner, spec, store

MAX_OPS = 50_000  # a cap on the ops recorded: a trace is for the first steps, not a whole run
# ops whose outputs are uninitialised memory: recorded (the op sequence counts) without a digest
UNINITIALISED = frozenset({"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"})


@dataclass(frozen=True)
class OpRecord:
    """One output of one aten op."""

    index: int  # position in the trace
    step: int  # optimiser steps completed before this op
    phase: str  # setup (before the first module call: init, first batch) | forward | backward | optimizer
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


class Enough(Exception):  # noqa: N818 - not an error: the traced steps are done
    """Raised after the last optimiser step to trace: stops a training loop that runs for epochs."""


class Tracer(TorchDispatchMode):
    """Records every aten op's tensor outputs while active (up to `max_ops` records). Use as
    `with Tracer() as t: ...; t.records`. The step counter advances after each optimiser step;
    with `steps`, the optimiser step that completes that many raises `Enough`."""

    def __init__(self, max_ops: int = MAX_OPS, steps: int | None = None):
        super().__init__()
        self.max_ops, self.steps = max_ops, steps
        self.records: list[OpRecord] = []
        self.truncated = False
        self.step = 0
        self._in_optimizer = False
        self._forward_seen = False  # ops before the first module call are "setup" (init, data)
        self._modules = ModuleTracker()
        self._stack = contextlib.ExitStack()

    def __enter__(self):
        def pre(*_):
            self._in_optimizer = True

        def post(*_):
            self._in_optimizer = False
            self.step += 1
            if self.steps is not None and self.step >= self.steps:
                raise Enough(self.step)

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
        if self._modules.is_bw:
            return "backward"
        return "forward" if self._forward_seen else "setup"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if len(self.records) >= self.max_ops:
            self.truncated = True
            return out
        module = innermost(self._modules.parents)
        self._forward_seen |= module != "Global"
        phase = self.phase()
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


# --- replaying two runs of a sweep ------------------------------------------------------------

def replay(run: spec.RunSpec, steps: int, max_ops: int = MAX_OPS) -> list[OpRecord]:
    """The trace of `run`'s first `steps` optimiser steps, in this process, through the runner's
    one path (threads, determinism, precision, attention kernel applied as in the sweep); whatever
    it writes goes to a scratch folder. At world size > 1 this is rank 0's model on the whole
    global batch (no process group here): the distribution of the batch is not replayed."""
    with tempfile.TemporaryDirectory() as scratch:
        fs, root = store.resolve(scratch)
        with Tracer(max_ops, steps) as t:
            try:
                runner.train_one(run, fs, root, runner.pick_device(run))
            except Exception:  # Enough, possibly wrapped (a user's function's errors are)
                if t.step < steps:
                    raise
    return t.records


def replay_elsewhere(run: spec.RunSpec, steps: int, max_ops: int) -> list[OpRecord]:
    """`replay` in a fresh interpreter of `run`'s stack: its env_vars set before torch imports, its
    py_executable where it names one, the tool's own environment of a pip/uv stack (built on this
    node if it has none: `orchestrator.stacks`). A container image (image_uri) is not replayed: a
    SpecError says so."""
    from orchestrator import stacks

    stack = run.stack
    if stack.image_uri is not None:
        raise spec.SpecError(f"stack {stack.name!r} is a container image; diverge replays env_vars, pip, uv and "
                             "py_executable stacks; compare runs of such stacks with `compare`")
    try:
        python = stacks.build(stack) if (stack.pip or stack.uv) else stack.py_executable or sys.executable
    except stacks.BuildError as e:
        raise spec.SpecError(f"stack {stack.name!r}: its environment could not be built: {e}") from None
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))
    env = os.environ | stack.env_vars | {"PYTHONPATH": path}
    with tempfile.TemporaryDirectory() as scratch:
        path = os.path.join(scratch, "trace.parquet")
        done = subprocess.run([python, "-m", "orchestrator.diverge", "--replay",
                               run.model_dump_json(), path, "--steps", str(steps), "--max-ops", str(max_ops)],
                              env=env, capture_output=True, text=True)
        if done.returncode:
            lines = done.stderr.strip().splitlines() or ["(no output)"]
            raise RuntimeError(f"replay of {run.run_id} failed: {lines[-1]}")
        return [OpRecord(**r) for r in pq.read_table(path).to_pylist()]


def pick_pair(runs: list[spec.RunSpec], side_a: dict[str, str],
              side_b: dict[str, str]) -> tuple[spec.RunSpec, spec.RunSpec]:
    """One run per side, of the lowest replica index both sides have (same seeds); UsageError when
    a side matches no run, or more than one run of that replica (the message names the columns
    that tell them apart)."""
    import pandas as pd

    from orchestrator import compare, reduce

    meta = pd.DataFrame([runner.base_row(r) for r in runs])
    in_a, in_b = compare.select(meta, side_a), compare.select(meta, side_b)
    for flag, side, mask in (("--a", side_a, in_a), ("--b", side_b, in_b)):
        if not mask.any():
            present = {k: sorted(set(compare._as_text(meta[k]))) for k in side if k in meta}
            raise reduce.UsageError(f"{flag}: no run of the sweep has {side}; values present: {present}")
    common = sorted(set(meta.loc[in_a, "replica"]) & set(meta.loc[in_b, "replica"]))
    replica = common[0] if common else None
    chosen = []
    for flag, mask in (("--a", in_a), ("--b", in_b)):
        rows = meta[mask & ((meta["replica"] == replica) if replica is not None else mask)]
        if len(rows) > 1:
            apart = [c for c in rows.columns if c not in ("run_id", "spec_json") and rows[c].astype(str).nunique() > 1]
            raise reduce.UsageError(f"{flag} matches {len(rows)} runs of replica {replica}; name one more key, "
                                    f"e.g. one of {', '.join(apart) or 'run_id'}")
        chosen.append(runs[rows.index[0]])
    return chosen[0], chosen[1]


def diverge(out: str, side_a: dict[str, str], side_b: dict[str, str], steps: int = 1,
            max_ops: int = MAX_OPS):
    """The one-row diverge table (a DataFrame) of two runs of OUT's sweep, each replayed in its own setting."""
    import pandas as pd
    import yaml

    from orchestrator import reduce

    fs, root = store.resolve(out)
    if not store.exists(fs, f"{root}/sweep.yaml"):
        raise reduce.UsageError(f"{out}: no sweep.yaml; give the results tree of a sweep")
    sweep = spec.parse(yaml.safe_load(store.read_bytes(fs, f"{root}/sweep.yaml")), f"{out}/sweep.yaml")
    a, b = pick_pair(spec.expand(sweep), side_a, side_b)
    parting = first_parting(replay_elsewhere(a, steps, max_ops), replay_elsewhere(b, steps, max_ops))
    label_a, label_b = (",".join(f"{k}={v}" for k, v in s.items()) for s in (side_a, side_b))
    return pd.DataFrame([{"a": label_a, "b": label_b, "run_a": a.run_id, "run_b": b.run_id, "steps": steps,
                          **parting.row()}])


def _replay_main(argv: list[str]) -> int:
    """The child of `replay_elsewhere`: trace one run, write the trace as Parquet."""
    parser = argparse.ArgumentParser(prog="python -m orchestrator.diverge --replay")
    parser.add_argument("spec_json")
    parser.add_argument("trace")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--max-ops", type=int, required=True)
    args = parser.parse_args(argv)
    records = replay(spec.expanded(args.spec_json), args.steps, args.max_ops)
    pq.write_table(pa.Table.from_pylist([asdict(r) for r in records]), args.trace)
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command line: 0 table written, 2 bad usage (nothing written)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--replay"]:
        return _replay_main(argv[1:])
    from orchestrator import compare, reduce

    parser = argparse.ArgumentParser(prog="python -m orchestrator.diverge", description=__doc__.split("\n")[0])
    parser.add_argument("out", help="results tree of a sweep (its sweep.yaml names the runs)")
    parser.add_argument("--a", required=True, help="side A, e.g. num_threads=1 or run_id=...")
    parser.add_argument("--b", required=True, help="side B, e.g. num_threads=2")
    parser.add_argument("--steps", type=int, default=1, help="optimiser steps to trace (default 1)")
    parser.add_argument("--max-ops", type=int, default=MAX_OPS, help=f"ops recorded per side at most ({MAX_OPS})")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.max_ops < 1:
        parser.error("--steps and --max-ops: give positive integers, e.g. --steps 1")
    if reduce.no_tree(args.out):
        return 2
    try:
        table = diverge(args.out, compare.parse_side("--a", args.a), compare.parse_side("--b", args.b),
                        args.steps, args.max_ops)
    except (reduce.UsageError, spec.SpecError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    fs, root = store.resolve(args.out)
    reduce.write_tables(fs, root, {"diverge": table})
    print(f"## diverge\n\n{reduce.format_markdown(table)}\n\n{table['summary'].iloc[0]}\n")
    print(f"table written to {root}/tables ({', '.join(reduce.FORMATS)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
