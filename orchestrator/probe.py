"""The determinism-overhead probe: what deterministic mode costs, and which part of it, measured
side by side.

One probe is one workload on one whole device (one Tune trial, see `spec.expand_probes`). It builds
the workload once, then runs `repeats` rounds of blocks, one block per mode, each mode one more
switch of torch's deterministic mode than the one below it:

    nondet          the framework's default kernels
    det_noinductor  deterministic kernels, inductor's own deterministic mode off (compiled workloads only)
    det_nofill      deterministic kernels (and, compiled, inductor's deterministic mode), no NaN fill
    det             all of it, with the NaN fill: what `impl`-fixed replicas run

The order rotates from one repeat to the next (a Latin square, mirrored every other cycle: for
three modes `det det_nofill nondet | det_nofill nondet det | nondet det det_nofill | nondet
det_nofill det | ...`), so each mode takes every position equally often and slow drift (clocks,
thermals, a busy neighbour) falls on every mode alike. The reducer's parts are the steps between
modes (det_nofill - nondet: the kernels; det - det_nofill: the fill), each paired by repeat.

Every block starts from the same initial weights, a fresh optimiser, the same global and augment
seeds and the same fixed list of full-size batches, so every mode does exactly the same work and
only the switches differ. A block runs `warmup` untimed steps (cuDNN autotuning, torch.compile,
caches) and then `steps` timed ones. With `compile`, each block compiles afresh under its own mode
(inductor generates other kernels in deterministic mode), so its warm-up must cover the
compilation. Each step is timed with the device synchronised: CUDA events recorded around the step
and read after one synchronisation at the block's end (no sync inside the timed steps);
`perf_counter` on a CPU, where eager kernels run synchronously.

What "deterministic" includes: torch's deterministic mode does two things, picks deterministic
kernels and NaN-fills every new uninitialised tensor (`torch.utils.deterministic.
fill_uninitialized_memory`, on by default), so that a kernel reading memory it never wrote gives
the same bits every run. The fill is a memset per allocation and costs time even on a CPU, where
the kernels of both modes are the same: hence `det_nofill`. `overhead.fill_uninitialized_memory:
false` leaves the `det` mode out (kernels only, a third cheaper). Each block's switches are in
`impl_flags`.

Which ops: after the timed blocks, one more `det` block (`det_nofill` without the fill) and one
`nondet` block run under `torch.profiler`; each op's self time per step in both (device time of the
kernels it launched on a GPU, CPU time on a CPU) goes to OUT/overhead/ops/<probe_id>.parquet, the
op whose time grows most first. Those two blocks are not timed rows: the profiler's own cost never
reaches the overhead.

Ops with no deterministic implementation: `use_deterministic_algorithms(True)` makes torch raise for
them. Deterministic blocks therefore run with `warn_only=True`; torch then warns instead, the
warnings are caught and the op names recorded (column `nondeterministic_ops`), and the step goes on
with the non-deterministic kernel. A det block that lists ops there was not fully deterministic.

Caveat (GPU): cuBLAS reads CUBLAS_WORKSPACE_CONFIG once, when CUDA creates its handle, so the probe
sets it (`:4096:8`) before any CUDA use and it stays set for every mode. Every mode runs at the
probe's `cudnn_benchmark` setting (a tooling axis; off by default, as in PyTorch), so autotuning is
never counted as a cost of determinism. Non-deterministic blocks get non-deterministic cuDNN
algorithms and atomic-add kernels, but their cuBLAS calls run under the deterministic workspace
setting. What that setting alone costs (usually little: it constrains cuBLAS's workspaces) is
therefore not in the overhead.

Output: OUT/overhead/<probe_id>.parquet, one row per timed step of every mode, with the
fingerprint, written last (its presence marks the probe done); `orchestrator.reduce` turns the
files into the overhead table (medians, overhead_pct = det/nondet - 1 and its parts, intervals
that resample whole repeats) and the op files into the overhead_ops table.
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
from typing import NamedTuple

import pyarrow as pa
import torch

from orchestrator import fingerprint, malloc, noise, runner, store
from orchestrator.axes import AXES
from orchestrator.spec import ProbeSpec
from workloads.train import layout, make_batch, make_optimizer, prepare, sdpa_backend, sync, train_step

# mode -> (deterministic kernels, inductor's deterministic mode when compiled, NaN fill of new tensors)
MODE_SWITCHES = {"nondet": (False, False, False), "det_noinductor": (True, False, False),
                 "det_nofill": (True, True, False), "det": (True, True, True)}
OPS_DIR = "overhead/ops"  # a folder inside overhead/, whose files store.done_probe_ids does not list
# Fingerprint columns carried by every step row, typed as in the run rows.
FINGERPRINT_COLUMNS = ("accelerator", "fingerprint_id", "hostname", "ray_node_id", "ray_node_ip", "gpu_name",
                       "gpu_count", "gpu_capability", "gpu_driver", "gpu_memory_mb", "gpu_sm_clock_mhz",
                       "cuda_version", "cudnn_version", "torch_version", "torchvision_version", "ray_version",
                       "python_version", "cpu_model", "num_threads", "instance_type", "env",
                       "cublas_version", "triton_version", "tf32_override", "tf32_settings",
                       "fingerprint_complete", "fingerprint_missing")
# Columns every row of a probe's two files carries: which probe, workload and stack.
COMMON_FIELDS = [
    pa.field("probe_id", pa.string()), pa.field("sweep", pa.string()), pa.field("arch", pa.string()),
    pa.field("dataset", pa.string()), pa.field("accelerator_requested", pa.string()),
    pa.field("nondeterministic_ops", pa.string()),  # comma-joined ops that lacked a deterministic kernel; "" if none
    pa.field("batch_size", pa.int32()), pa.field("warmup", pa.int32()),
    # the tooling values, as in run rows (cudnn_benchmark: the same in every mode; world_size: always 1)
    *[store.RUN_SCHEMA.field(a.column) for a in AXES if a.column not in FINGERPRINT_COLUMNS],
    pa.field("spec_json", pa.string()),
    *[store.RUN_SCHEMA.field(c) for c in FINGERPRINT_COLUMNS],
]
PROBE_SCHEMA = pa.schema([
    *COMMON_FIELDS,
    ("mode", pa.string()),  # a MODE_SWITCHES key
    ("repeat", pa.int32()),  # index of the round of blocks, one block per mode
    ("block", pa.int32()),  # position of the block in the probe's sequence, 0 .. modes*repeats-1
    ("step", pa.int32()),  # timed step within the block, warm-up excluded
    ("step_ms", pa.float64()),  # one training step (batch gather, augment, forward, backward, update), ms
    ("block_loss", pa.float64()),  # mean loss over the block's steps: on a CPU equal in every mode
    ("impl_flags", pa.string()),  # JSON of the determinism switches of the block
])
OPS_SCHEMA = pa.schema([
    *COMMON_FIELDS,
    ("op", pa.string()),  # profiler event name, e.g. aten::fill_
    ("clock", pa.string()),  # device: kernel time the op launched itself (GPU); cpu: CPU self time
    ("profiled_mode", pa.string()),  # the deterministic mode profiled: det, or det_nofill without the fill
    ("profiled_steps", pa.int32()),  # steps of each profiled block
    ("ms_det", pa.float64()), ("ms_nondet", pa.float64()),  # self time per step, ms; 0 where the op did not run
    ("delta_ms", pa.float64()),  # ms_det - ms_nondet
    ("calls_det", pa.float64()), ("calls_nondet", pa.float64()),  # calls per step
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


def inductor_has_deterministic() -> bool:
    """Whether this torch has inductor's own deterministic mode (torch >= 2.6)."""
    import torch._inductor.config as inductor  # ~1.5 s, only for compiled probes

    return hasattr(inductor, "deterministic")


def modes(spec: ProbeSpec) -> tuple[str, ...]:
    """The probe's modes in the order of its first repeat: det (unless fill_uninitialized_memory is
    false), det_nofill, det_noinductor (compiled, where inductor has a deterministic mode), nondet."""
    fill = ("det",) if spec.overhead.fill_uninitialized_memory else ()
    inductor = ("det_noinductor",) if spec.compile and inductor_has_deterministic() else ()
    return (*fill, "det_nofill", *inductor, "nondet")


def block_order(order: tuple[str, ...], repeat: int) -> tuple[str, ...]:
    """The modes of one repeat: rotated by `repeat`, and mirrored in every other cycle of
    len(order) repeats (a Williams design for an odd number of modes): over every cycle each mode
    takes each position once; over two cycles of three modes each follows every other mode twice."""
    k = repeat % len(order)
    rotated = order[k:] + order[:k]
    return rotated[::-1] if (repeat // len(order)) % 2 else rotated


def set_mode(mode: str, spec: ProbeSpec) -> dict[str, object]:
    """Set torch's switches for `mode` (MODE_SWITCHES) and return them, as the block's impl_flags.
    Deterministic modes warn (and record) instead of raising for an op without such a kernel."""
    kernels, inductor, fill = MODE_SWITCHES[mode]
    flags = noise.apply_impl(kernels, spec.cudnn_benchmark, spec.compile, warn_only=kernels)
    if "inductor_deterministic" in flags:  # compiled: apply_impl set it to `kernels`
        import torch._inductor.config as inductor_config

        inductor_config.deterministic = flags["inductor_deterministic"] = inductor
    torch.utils.deterministic.fill_uninitialized_memory = fill  # only read under deterministic kernels
    flags["warn_only"] = torch.is_deterministic_algorithms_warn_only_enabled()
    flags["fill_uninitialized_memory"] = fill
    return flags


def fixed_batches(n: int, batch_size: int, count: int, seed: int, device: torch.device) -> list[torch.Tensor]:
    """`count` full-size batches of indices into n examples, from consecutive permutations drawn with
    `seed`: every block replays this list, so every mode sees the same data. Full size even when
    batch_size > n, so that every timed step does the same work."""
    g = torch.Generator().manual_seed(seed)
    need = count * batch_size
    perm = torch.cat([torch.randperm(n, generator=g) for _ in range(-(-need // n))])[:need]
    return list(perm.to(device).view(count, batch_size))


class Block(NamedTuple):
    times: list[float]  # ms per timed step
    loss: float  # mean over every step of the block
    ops: set[str]  # ops without a deterministic kernel
    flags: dict  # the switches set
    profile: dict[str, tuple[float, float]] | None  # op -> (self ms, calls) per timed step, when profiled


def profiler(device: torch.device) -> torch.profiler.profile:
    """A profiler of host ops, and of the kernels they launch on a GPU."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    else:  # kineto's GPU probe logs "gpuGetDeviceCount failed", an error only on a GPU box
        os.environ.setdefault("KINETO_LOG_LEVEL", "5")
    return torch.profiler.profile(activities=activities)


def op_times(prof: torch.profiler.profile, steps: int, device: torch.device) -> dict[str, tuple[float, float]]:
    """op -> (self time in ms, calls), per step of a profile of `steps` steps. Host-side op events
    only, so that a GPU kernel counts once, as device time of the op that launched it."""
    from torch.autograd import DeviceType

    clock = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return {e.key: (getattr(e, clock) / 1e3 / steps, e.count / steps)
            for e in prof.key_averages() if e.device_type == DeviceType.CPU}


def op_table(det: dict[str, tuple[float, float]], nondet: dict[str, tuple[float, float]]) -> list[dict]:
    """One row per op of either profile: self ms and calls per step in each mode (0 where it did not
    run) and the growth in deterministic mode, the op that grows most first."""
    rows = [{"op": op, "ms_det": det.get(op, (0.0, 0.0))[0], "ms_nondet": nondet.get(op, (0.0, 0.0))[0],
             "calls_det": det.get(op, (0.0, 0.0))[1], "calls_nondet": nondet.get(op, (0.0, 0.0))[1]}
            for op in sorted(det.keys() | nondet.keys())]
    return sorted((r | {"delta_ms": r["ms_det"] - r["ms_nondet"]} for r in rows), key=lambda r: -r["delta_ms"])


def run_block(model: torch.nn.Module, init_state: dict, x: torch.Tensor, y: torch.Tensor,
              batches: list[torch.Tensor], cfg, spec: ProbeSpec, mode: str, device: torch.device,
              profile: bool = False) -> Block:
    """One block: set the mode, reset weights, optimiser and seeds (and compile under the mode), run
    warm-up then timed steps, the timed ones under the profiler when `profile`."""
    flags = set_mode(mode, spec)
    model.load_state_dict(init_state)
    net = prepare(model, cfg, device)
    opt = make_optimizer(model, cfg)
    aug = runner.augment_streams(spec.seeds, device)  # and the global RNG (dropout)
    net.train()
    timer, total = StepTimer(device), torch.zeros((), device=device)
    warmup = spec.overhead.warmup
    with recording_nondeterministic_ops() as ops:
        for idx in batches[:warmup]:
            total += train_step(net, opt, make_batch(x, idx, cfg, aug), y[idx], cfg)
        sync(device)  # outside the timers: keeps the warm-up's kernels out of a profile
        with profiler(device) if profile else contextlib.nullcontext() as prof:
            for idx in batches[warmup:]:
                timer.start()
                total += train_step(net, opt, make_batch(x, idx, cfg, aug), y[idx], cfg)
                timer.stop()
            times = timer.read()
    profiled = op_times(prof, len(times), device) if profile else None
    return Block(times, float(total) / len(batches), ops, flags, profiled)


class Measurement(NamedTuple):
    steps: list[dict]  # one per timed step of every block
    ops: set[str]  # ops without a deterministic kernel
    profile: list[dict]  # one per op (op_table), with the mode profiled, its steps and the clock


def measure(spec: ProbeSpec, device: torch.device) -> Measurement:
    """All blocks of one probe, then the two profiled blocks."""
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = noise.CUBLAS_WORKSPACE  # before any CUDA use (docstring)
    malloc.keep_freed_memory()  # as in the replica runner: no page-fault churn in the timed steps
    torch.set_num_threads(spec.num_threads)
    if device.type == "cuda":
        torch.cuda.init()  # now started with the workspace set: apply_impl(False) keeps it
    data, model, cfg = runner.build_workload(spec)
    model.to(device)  # before the copy below: every block then loads weights already on the device
    x, y = layout(data.train_x.to(device), cfg), data.train_y.to(device)
    o = spec.overhead
    batches = fixed_batches(len(x), cfg.batch_size, o.warmup + o.steps, spec.seeds.order, device)
    init_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    order, rows, all_ops = modes(spec), [], set()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    try:
        for r in range(o.repeats):
            for i, mode in enumerate(block_order(order, r)):
                b = run_block(model, init_state, x, y, batches, cfg, spec, mode, device)
                all_ops |= b.ops
                rows += [{"mode": mode, "repeat": r, "block": len(order) * r + i, "step": s, "step_ms": t,
                          "block_loss": b.loss, "impl_flags": json.dumps(b.flags, sort_keys=True)}
                         for s, t in enumerate(b.times)]
        det, nondet = (run_block(model, init_state, x, y, batches, cfg, spec, m, device, profile=True)
                       for m in (order[0], "nondet"))
    finally:  # a reused worker process runs replicas next: leave torch's default as it was
        torch.utils.deterministic.fill_uninitialized_memory = fill
    clock = "device" if device.type == "cuda" else "cpu"
    about = {"profiled_mode": order[0], "profiled_steps": o.steps, "clock": clock}
    return Measurement(rows, all_ops | det.ops, [r | about for r in op_table(det.profile, nondet.profile)])


def ops_path(root: str, probe_id: str) -> str:
    return f"{root}/{OPS_DIR}/{probe_id}.parquet"


def run(spec: ProbeSpec, out: str) -> dict:
    """Run one probe and write OUT/overhead/ops/<probe_id>.parquet, then OUT/overhead/<probe_id>.parquet
    (the file that marks the probe done). An error is returned as status failed, never raised, and
    writes no file, so a re-run of the sweep tries the probe again."""
    fs, root = store.resolve(out)
    device = runner.pick_device(spec)
    try:
        with sdpa_backend(spec.attention, device):  # the probe times the run's attention kernel too
            m = measure(spec, device)
    except Exception as e:  # the other trials go on; Ray forwards this line to the sweep's console
        error = f"{type(e).__name__}: {e}"
        print(f"overhead probe {spec.probe_id} failed: {error}", file=sys.stderr, flush=True)
        return {"status": "failed", "error": error}
    w = spec.workload
    fp = fingerprint.collect(device, spec.compile, spec.stack.packages())
    common = {"probe_id": spec.probe_id, "sweep": spec.sweep, "arch": w.arch, "dataset": w.dataset,
              "accelerator_requested": spec.accelerator, "nondeterministic_ops": ",".join(sorted(m.ops)),
              "batch_size": w.batch_size, "warmup": spec.overhead.warmup,
              **{a.column: a.cell(getattr(spec, a.name)) for a in AXES if a.column not in FINGERPRINT_COLUMNS},
              "spec_json": spec.model_dump_json(), **{k: v for k, v in fp.items() if k in FINGERPRINT_COLUMNS}}
    store.write_table(fs, ops_path(root, spec.probe_id),
                      pa.Table.from_pylist([common | o for o in m.profile], schema=OPS_SCHEMA))
    store.write_table(fs, store.overhead_path(root, spec.probe_id),
                      pa.Table.from_pylist([common | s for s in m.steps], schema=PROBE_SCHEMA))
    step_ms = {mode: statistics.median(s["step_ms"] for s in m.steps if s["mode"] == mode) for mode in modes(spec)}
    return {"status": "ok", "error": None, "step_ms": step_ms, "nondeterministic_ops": common["nondeterministic_ops"]}
