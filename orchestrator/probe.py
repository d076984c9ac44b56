"""The determinism-overhead probe: what deterministic kernels cost, measured side by side.

One probe is one workload on one whole device (one Tune trial, see `spec.expand_probes`). It builds
the workload once, then runs `repeats` pairs of blocks, deterministic (`det`) and non-deterministic
(`nondet`), alternating which mode goes first in each pair so that slow drift (clocks, thermals, a
busy neighbour) falls on both modes alike:

    repeat 0: det nondet | repeat 1: nondet det | repeat 2: det nondet | ...

Every block starts from the same initial weights, a fresh optimiser, the same global and augment
seeds and the same fixed list of full-size batches, so both modes do exactly the same work and only
the kernels differ. A block runs `warmup` untimed steps (cuDNN autotuning, torch.compile, caches)
and then `steps` timed ones. With `compile`, each block compiles afresh under its own mode (inductor
generates other kernels in deterministic mode), so its warm-up must cover the compilation. Each
step is timed with the device synchronised: CUDA events recorded around the step and read after
one synchronisation at the block's end (no sync inside the block); `perf_counter` on a CPU, where
eager kernels run synchronously.

What "deterministic" includes: torch's deterministic mode does two things, picks deterministic
kernels and NaN-fills every new uninitialised tensor (`torch.utils.deterministic.
fill_uninitialized_memory`, on by default), so that a kernel reading memory it never wrote gives
the same bits every run. The fill is a memset per allocation and costs time even on a CPU, where
the kernels of both modes are the same; `overhead.fill_uninitialized_memory: false` leaves it off,
so that only kernel choice differs between the modes. Each block's switches are in `impl_flags`.

Ops with no deterministic implementation: `use_deterministic_algorithms(True)` makes torch raise for
them. Deterministic blocks therefore run with `warn_only=True`; torch then warns instead, the
warnings are caught and the op names recorded (column `nondeterministic_ops`), and the step goes on
with the non-deterministic kernel. A det block that lists ops there was not fully deterministic.

Caveat (GPU): cuBLAS reads CUBLAS_WORKSPACE_CONFIG once, when CUDA creates its handle, so the probe
sets it (`:4096:8`) before any CUDA use and it stays set for both modes. Both modes run at the
probe's `cudnn_benchmark` setting (a tooling axis; off by default, as in PyTorch), so autotuning is
never counted as a cost of determinism. Non-deterministic blocks get non-deterministic cuDNN
algorithms and atomic-add kernels, but their cuBLAS calls run under the deterministic workspace
setting. What that setting alone costs (usually little: it constrains cuBLAS's workspaces) is
therefore not in the overhead.

Output: OUT/overhead/<probe_id>.parquet, one row per timed step of both modes, with the
fingerprint; `orchestrator.reduce` turns the files into the overhead table (medians, overhead_pct =
det/nondet - 1, an interval that resamples det/nondet block pairs).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import statistics
import sys
import time
import warnings
from collections.abc import Iterator

import pyarrow as pa
import torch

from orchestrator import fingerprint, malloc, noise, runner, store
from orchestrator.spec import ProbeSpec
from workloads.train import make_batch, make_optimizer, prepare, sync, train_step

MODES = ("det", "nondet")
# Fingerprint columns carried by every step row, typed as in the run rows.
FINGERPRINT_COLUMNS = ("accelerator", "fingerprint_id", "hostname", "ray_node_id", "ray_node_ip", "gpu_name",
                       "gpu_count", "gpu_capability", "gpu_driver", "gpu_memory_mb", "gpu_sm_clock_mhz",
                       "cuda_version", "cudnn_version", "torch_version", "torchvision_version", "ray_version",
                       "python_version", "cpu_model", "num_threads", "instance_type", "env",
                       "cublas_version", "triton_version", "tf32_override", "tf32_settings",
                       "fingerprint_complete", "fingerprint_missing")
PROBE_SCHEMA = pa.schema([
    ("probe_id", pa.string()), ("sweep", pa.string()), ("arch", pa.string()), ("dataset", pa.string()),
    ("accelerator_requested", pa.string()),
    ("mode", pa.string()),  # det | nondet
    ("repeat", pa.int32()),  # index of the det/nondet pair
    ("block", pa.int32()),  # position of the block in the probe's sequence, 0 .. 2*repeats-1
    ("step", pa.int32()),  # timed step within the block, warm-up excluded
    ("step_ms", pa.float64()),  # one training step (batch gather, augment, forward, backward, update), ms
    ("block_loss", pa.float64()),  # mean loss over the block's steps: on a CPU equal in both modes
    ("nondeterministic_ops", pa.string()),  # comma-joined ops that lacked a deterministic kernel; "" if none
    ("impl_flags", pa.string()),  # JSON of the determinism switches of the block
    ("batch_size", pa.int32()), ("warmup", pa.int32()),
    ("precision", pa.string()), ("channels_last", pa.bool_()), ("compiled", pa.bool_()),
    ("cudnn_benchmark", pa.bool_()),  # cuDNN autotuning, the same in both modes
    ("spec_json", pa.string()),
    *[store.RUN_SCHEMA.field(c) for c in FINGERPRINT_COLUMNS],
])

_NONDET_ALERT = re.compile(r"^(.+?) does not have a deterministic implementation", re.S)


def nondeterministic_op(message: str) -> str | None:
    """The op named by torch's "X does not have a deterministic implementation" alert (raised as a
    RuntimeError, or warned under warn_only), else None."""
    m = _NONDET_ALERT.match(message.strip())
    return m.group(1) if m else None


@contextlib.contextmanager
def recording_nondeterministic_ops() -> Iterator[set[str]]:
    """Collect, into the yielded set, the ops that warned for lacking a deterministic kernel (under
    `use_deterministic_algorithms(True, warn_only=True)`); the set is filled when the block exits.
    Every alert is caught, not only the first per call site; other warnings pass through."""
    found: set[str] = set()
    with warnings.catch_warnings(record=True) as caught:
        warnings.filterwarnings("always", message=r".*does not have a deterministic implementation")
        yield found
    for w in caught:
        op = nondeterministic_op(str(w.message))
        if op is not None:
            found.add(op)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


class StepTimer:
    """Per-step times in ms. On a GPU: a pair of CUDA events around each step, read after a single
    synchronisation at the block's end; on a CPU: perf_counter (eager CPU kernels are synchronous)."""

    def __init__(self, device: torch.device):
        self.device, self.cuda, self.marks = device, device.type == "cuda", []

    def _now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self) -> None:
        self._t0 = self._now()

    def stop(self) -> None:
        self.marks.append((self._t0, self._now()))

    def read(self) -> list[float]:
        sync(self.device)  # the block's one host-device sync
        if self.cuda:
            return [a.elapsed_time(b) for a, b in self.marks]
        return [(b - a) * 1e3 for a, b in self.marks]


def fixed_batches(n: int, batch_size: int, count: int, seed: int, device: torch.device) -> list[torch.Tensor]:
    """`count` full-size batches of indices into n examples, from consecutive permutations drawn with
    `seed`: every block replays this list, so both modes see the same data. Full size even when
    batch_size > n, so that every timed step does the same work."""
    g = torch.Generator().manual_seed(seed)
    need = count * batch_size
    perm = torch.cat([torch.randperm(n, generator=g) for _ in range(-(-need // n))])[:need]
    return list(perm.to(device).view(count, batch_size))


def run_block(model: torch.nn.Module, init_state: dict, x: torch.Tensor, y: torch.Tensor,
              batches: list[torch.Tensor], cfg, spec: ProbeSpec, deterministic: bool,
              device: torch.device) -> tuple[list[float], float, set[str], dict]:
    """One block: reset weights, optimiser and seeds, set the mode (and compile under it), run
    warm-up then timed steps. Returns (step times in ms, mean loss, ops without a deterministic
    kernel, switches set)."""
    flags = noise.apply_impl(deterministic, spec.cudnn_benchmark, spec.compile, warn_only=deterministic)
    torch.utils.deterministic.fill_uninitialized_memory = spec.overhead.fill_uninitialized_memory
    flags["warn_only"] = torch.is_deterministic_algorithms_warn_only_enabled()
    flags["fill_uninitialized_memory"] = deterministic and spec.overhead.fill_uninitialized_memory
    model.load_state_dict(init_state)
    net = prepare(model, cfg, device)
    opt = make_optimizer(model, cfg)
    aug = runner.augment_streams(spec.seeds, device)  # and the global RNG (dropout)
    net.train()
    timer, total = StepTimer(device), torch.zeros((), device=device)
    warmup = spec.overhead.warmup
    with recording_nondeterministic_ops() as ops:
        sync(device)
        for i, idx in enumerate(batches):
            if i >= warmup:
                timer.start()
            loss = train_step(net, opt, make_batch(x, idx, cfg, aug), y[idx], cfg)
            if i >= warmup:
                timer.stop()
            total += loss
        times = timer.read()
    return times, float(total) / len(batches), ops, flags


def measure(spec: ProbeSpec, device: torch.device) -> tuple[list[dict], set[str]]:
    """All blocks of one probe: (one dict per timed step, ops without a deterministic kernel)."""
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = noise.CUBLAS_WORKSPACE  # before any CUDA use (docstring)
    malloc.keep_freed_memory()  # as in the replica runner: no page-fault churn in the timed steps
    torch.set_num_threads(spec.num_threads)
    if device.type == "cuda":
        torch.cuda.init()  # now started with the workspace set: apply_impl(False) keeps it
    data, model, cfg = runner.build_workload(spec)
    model.to(device)  # before the copy below: every block then loads weights already on the device
    x, y = data.train_x.to(device), data.train_y.to(device)
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    o = spec.overhead
    batches = fixed_batches(len(x), cfg.batch_size, o.warmup + o.steps, spec.seeds.order, device)
    init_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    rows, all_ops = [], set()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    try:
        for r in range(o.repeats):
            for i, mode in enumerate(MODES if r % 2 == 0 else MODES[::-1]):
                times, loss, ops, flags = run_block(model, init_state, x, y, batches, cfg, spec,
                                                    mode == "det", device)
                all_ops |= ops
                rows += [{"mode": mode, "repeat": r, "block": 2 * r + i, "step": s, "step_ms": t,
                          "block_loss": loss, "impl_flags": json.dumps(flags, sort_keys=True)}
                         for s, t in enumerate(times)]
    finally:  # a reused worker process runs replicas next: leave torch's default as it was
        torch.utils.deterministic.fill_uninitialized_memory = fill
    return rows, all_ops


def run(spec: ProbeSpec, out: str) -> dict:
    """Run one probe and write OUT/overhead/<probe_id>.parquet. An error is returned as status failed,
    never raised, and writes no file, so a re-run of the sweep tries the probe again."""
    fs, root = store.resolve(out)
    device = runner.pick_device(spec)
    try:
        steps, ops = measure(spec, device)
    except Exception as e:  # the other trials go on; Ray forwards this line to the sweep's console
        error = f"{type(e).__name__}: {e}"
        print(f"overhead probe {spec.probe_id} failed: {error}", file=sys.stderr, flush=True)
        return {"status": "failed", "error": error}
    w = spec.workload
    common = {"probe_id": spec.probe_id, "sweep": spec.sweep, "arch": w.arch, "dataset": w.dataset,
              "accelerator_requested": spec.accelerator, "nondeterministic_ops": ",".join(sorted(ops)),
              "batch_size": w.batch_size, "warmup": spec.overhead.warmup, "precision": spec.precision,
              "channels_last": spec.channels_last, "compiled": spec.compile, "cudnn_benchmark": spec.cudnn_benchmark,
              "spec_json": spec.model_dump_json(),
              **{k: v for k, v in fingerprint.collect(device, spec.compile).items() if k in FINGERPRINT_COLUMNS}}
    table = pa.Table.from_pylist([common | s for s in steps], schema=PROBE_SCHEMA)
    store.write_table(fs, store.overhead_path(root, spec.probe_id), table)
    med = {m: statistics.median(s["step_ms"] for s in steps if s["mode"] == m) for m in MODES}
    return {"status": "ok", "error": None, "step_ms_det": med["det"], "step_ms_nondet": med["nondet"],
            "overhead_pct": (med["det"] / med["nondet"] - 1) * 100,
            "nondeterministic_ops": common["nondeterministic_ops"]}
