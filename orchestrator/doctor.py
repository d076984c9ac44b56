"""`python -m orchestrator.doctor [--device cuda|cpu] [--minutes M] [--json PATH]`

What this node's tooling does to training, in about two minutes, before a sweep of hundreds of
runs is launched on it: do replicas with the same seeds differ here (`impl` noise), are
deterministic replicas identical (`control`), do CPU thread counts change bits, and what do
deterministic mode costs and which part of it (kernels, NaN fill, top ops). Every check goes
through the sweep's own code (`runner.run` for replicas, `probe.measure` for the overhead and its
profile, `metrics` for churn, the parts and their intervals) but without Ray,
so the doctor runs on a bare GPU box with torch, torchvision, pydantic, pyarrow, PyYAML, scipy and
safetensors.

Two worker processes, because CUDA reads CUBLAS_WORKSPACE_CONFIG once, when it starts: a process
cannot run framework-default replicas and deterministic ones both as a sweep would. A fresh
`deterministic` worker runs the control replicas, the threads check and the probes (the workspace
is set before CUDA starts); a fresh `default` worker runs the impl replicas with the framework's
defaults. The two start together and the impl replicas run beside the control and threads checks,
whose bits do not depend on what else runs: that hides one process start and the impl replicas
(`--minutes 0.5` on 2 CPU cores: 27 and 31 s against 35 and 38 s before, the same verdicts). The
probes come last and alone, since they time steps. The doctor's own process never touches CUDA
beyond asking whether there is one.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from itertools import repeat

import numpy as np
import torch
from safetensors.torch import load_file

from orchestrator import diverge, metrics, noise, probe, runner, spec, store

DEFAULT_MINUTES = 2.0
# Replicas learn the synthetic data part-way (~90% accuracy here), so churn has room to show; no
# augmentation: random crops of random templates only slow learning. Probes time what the overhead
# sweeps time (batch 128, on-device crop+flip).
REPLICA = {"arch": "small_cnn", "dataset": "synthetic", "batch_size": 64, "optimizer": "adam", "lr": 0.001}
PROBE = {"arch": "small_cnn", "dataset": "synthetic", "augmentation": "crop+flip", "batch_size": 128}
PARTS = ("kernels", "fill", "inductor")  # metrics.COST_PARTS besides the total
PART_KEYS = ("overhead_pct", "lo", "hi", *(f"{p}_{k}" for p in PARTS for k in ("pct", "lo", "hi")))
TOP_OPS = 5  # ops per probe in the printout and the JSON
# Per device, sized so that the whole doctor fits DEFAULT_MINUTES (CPU, 2 shared cores: 100 s measured at a load
# average of 2.3-4.5 with three probe modes and two profiled blocks per probe; 30 s at 4 when probes timed two
# modes); --minutes scales the probes' timed steps, the one knob that narrows the overhead interval.
PLANS = {
    "cpu": {"replica": {"dataset_args": {"n_train": 1024, "n_test": 256, "image_size": 32}, "epochs": 1},
            "overhead": {"steps": 6, "warmup": 1, "repeats": 3},
            "probes": [{**PROBE, "dataset_args": {"n_train": 512, "n_test": 16, "image_size": 32}},
                       {**PROBE, "arch": "resnet18", "batch_size": 16,  # 16x16: a quarter of a 32x32 step
                        "dataset_args": {"n_train": 256, "n_test": 16, "image_size": 16}}]},
    "cuda": {"replica": {"dataset_args": {"n_train": 4096, "n_test": 1024, "image_size": 32, "noise": 3.0},
                         "epochs": 2},
             "overhead": {"steps": 40, "warmup": 5, "repeats": 5},
             "probes": [{**PROBE, "dataset_args": {"n_train": 4096, "n_test": 16, "image_size": 32}},
                        {**PROBE, "arch": "resnet18",
                         "dataset_args": {"n_train": 4096, "n_test": 16, "image_size": 32}}]},
}


class UsageError(ValueError):
    """Bad command line: one line naming the option and the fix, exit 2."""


# --- what to run -----------------------------------------------------------------------------------

def replica_specs(device: str, threads: int) -> tuple[list[spec.RunSpec], list[spec.RunSpec], list[spec.RunSpec]]:
    """(3 impl replicas, 2 control replicas) of small_cnn on the device, all with the same seeds, and
    (the control replica at 1 thread, at `threads`) on the CPU for the threads check. Replicas and
    probes run at the sweep's default of 1 intra-op thread."""
    gpus = 1 if device == "cuda" else 0
    runs = spec.expand(spec.parse({"name": "doctor", "replicas": 3, "noise": ["impl", "control"],
                                   "workloads": [{**REPLICA, **PLANS[device]["replica"]}],
                                   "resources": {"gpus": gpus}}))
    # the CPU's small plan also on a GPU node: one thread would take minutes on the GPU plan's data
    cpu = spec.expand(spec.parse({"name": "doctor-threads", "replicas": 1, "noise": ["control"],
                                  "workloads": [{**REPLICA, **PLANS["cpu"]["replica"]}],
                                  "tooling": {"num_threads": [1, threads]}}))
    return [r for r in runs if r.noise == "impl"], [r for r in runs if r.noise == "control"][:2], cpu


def probe_specs(device: str, minutes: float, sweep_file: str | None,
                archs: list[str] | None) -> list[spec.ProbeSpec]:
    """The overhead probes: the built-in small_cnn and resnet18 (timed steps scaled by `minutes`), or
    those of a sweep file (its own overhead section, one probe per workload, optionally only `archs`)."""
    gpus = 1 if device == "cuda" else 0
    if sweep_file is None:
        plan = PLANS[device]
        overhead = {**plan["overhead"], "steps": max(2, round(plan["overhead"]["steps"] * minutes / DEFAULT_MINUTES))}
        sweep = spec.parse({"name": "doctor", "noise": [], "overhead": overhead, "workloads": plan["probes"],
                            "resources": {"gpus": gpus}})
    else:
        try:
            sweep = spec.load(sweep_file)
        except spec.SpecError as e:
            raise UsageError(str(e).splitlines()[0]) from None
        if sweep.overhead is None:
            raise UsageError(f"--probes: {sweep_file} has no overhead section; give a sweep that has one "
                             "(e.g. sweeps/overhead_gpu.yaml)")
        sweep = sweep.model_copy(update={"accelerators": ["any"]})  # one probe per workload, on this node
    probes = [p.model_copy(update={"gpus": gpus}) for p in spec.expand_probes(sweep)]
    if archs:
        unknown = sorted(set(archs) - {p.workload.arch for p in probes})
        if unknown:
            raise UsageError(f"--arch: {', '.join(unknown)} not in the probes; choose from "
                             f"{', '.join(sorted({p.workload.arch for p in probes}))}")
        probes = [p for p in probes if p.workload.arch in archs]
    return probes


# --- inside the workers ----------------------------------------------------------------------------

def cuda_started() -> bool:
    """Asked first in the deterministic worker: True when something had started CUDA before the
    runner could set CUBLAS_WORKSPACE_CONFIG (a site hook, an import), which defeats determinism."""
    return torch.cuda.is_initialized()


def run_probe(p: spec.ProbeSpec) -> dict:
    """One overhead probe; an error is returned, not raised, so the other checks still report."""
    try:
        m = probe.measure(p, runner.pick_device(p))
    except Exception as e:  # recorded in the JSON and the verdicts, never dropped
        return {"error": f"{type(e).__name__}: {e}"}
    return {"rows": m.steps, "ops": sorted(m.ops), "profile": m.profile}


# --- summaries (pure) ------------------------------------------------------------------------------

def max_abs_diff(states: list[dict[str, torch.Tensor]]) -> float:
    """Largest |w_i - w_j| over every floating-point weight and every pair of replicas."""
    worst = 0.0
    for name, t in states[0].items():
        if t.is_floating_point() and t.numel():
            stack = torch.stack([s[name].double() for s in states])
            worst = max(worst, float((stack.amax(0) - stack.amin(0)).max()))
    return worst


def replica_summary(rows: list[dict], out: str) -> dict:
    """Digests, accuracy, churn and max |Δw| of a group of replicas with the same seeds; failed runs
    are listed with their error. `identical` is None below two ok runs."""
    ok = [r for r in rows if r["status"] == "ok"]
    digests = [r["weights_sha256"] for r in ok]
    root = store.absolute(out)
    states = [load_file(store.weights_path(root, r["run_id"])) for r in ok]
    enough = len(ok) >= 2
    return {"n_runs": len(rows), "errors": [r["error"] for r in rows if r["status"] != "ok"],
            "num_threads": [r.get("num_threads") for r in rows], "weights_sha256": digests,
            "identical": len(set(digests)) == 1 if enough else None,
            "max_abs_dw": max_abs_diff(states) if enough else None,
            "churn": metrics.churn(np.array([r["predictions"] for r in ok])) if enough else None,
            "test_accuracy": [r["test_accuracy"] for r in ok]}


def repeat_units(rows: list[dict], mode: str) -> list[np.ndarray]:
    """Step times of one mode, one array per repeat (a round of one block per mode), in repeat order:
    the interval takes a repeat as one unit, as the reducer's overhead table does."""
    return [np.array([r["step_ms"] for r in rows if r["repeat"] == k and r["mode"] == mode])
            for k in sorted({r["repeat"] for r in rows})]


def overhead_summary(p: spec.ProbeSpec, result: dict) -> dict:
    """One probe as {arch, overhead_pct, lo, hi, kernels_pct, ..., fill_pct, ..., top_ops, ...}: what
    deterministic mode costs in percent of the default step and its parts (metrics.cost_parts, paired
    intervals over repeats), and the ops whose self time grows most in deterministic mode."""
    w = p.workload
    args = ",".join(f"{k}={v}" for k, v in sorted(w.arch_args.items()))
    row = {"arch": w.arch, "arch_args": w.arch_args, "label": f"{w.arch}({args})" if args else w.arch,
           "batch_size": w.batch_size, "image_size": w.dataset_args.get("image_size"),
           "device": "cuda" if p.gpus else "cpu"}
    if "error" in result:
        return row | dict.fromkeys(PART_KEYS) | {"nondeterministic_ops": [], "top_ops": [], "error": result["error"]}
    rows = result["rows"]
    blocks = {m: repeat_units(rows, m) for m in dict.fromkeys(r["mode"] for r in rows)}
    parts = metrics.cost_parts(blocks)
    values = [_finite(v) for part in ("total", *PARTS) for v in parts[part]]
    medians = {f"step_ms_{m}": float(np.median(np.concatenate(u))) for m, u in blocks.items()}  # per mode timed
    top = [{k: o[k] for k in ("op", "ms_nondet", "ms_det", "delta_ms")} for o in result["profile"][:TOP_OPS]]
    return row | dict(zip(PART_KEYS, values)) | medians | {"nondeterministic_ops": result["ops"], "n_steps": len(rows),
                                                           "top_ops": top, "error": None}


def _finite(x: float) -> float | None:
    """JSON has no NaN: an undefined number is null."""
    return None if math.isnan(x) else x


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.1f}%"


def _part(o: dict, part: str) -> str:
    """A part of the cost with its interval: `+9.8% [+7.0%, +12.1%]`."""
    return f"{_pct(o[f'{part}_pct'])} [{_pct(o[f'{part}_lo'])}, {_pct(o[f'{part}_hi'])}]"


def _breakdown(o: dict) -> str:
    """The parts of a probe's cost, and what to do when the NaN fill is most of it."""
    inductor = f", inductor's deterministic mode {_part(o, 'inductor')} of it" if o["inductor_pct"] is not None else ""
    text = f"deterministic kernels {_part(o, 'kernels')}{inductor}, NaN fill {_part(o, 'fill')}"
    fill, kernels = o["fill_pct"], o["kernels_pct"]
    if o["fill_lo"] is not None and o["fill_lo"] > 0 and (kernels is None or fill > kernels):
        same = " (a CPU runs the same kernels in every mode)" if o["device"] == "cpu" else ""
        text += (f": most of the cost is torch's NaN fill of new tensors, not the kernels{same}; "
                 "torch.utils.deterministic.fill_uninitialized_memory = False removes it and keeps deterministic "
                 "kernels (the fill only matters to code that reads memory it never wrote)")
    return text


def _spread(group: dict) -> str:
    if group["max_abs_dw"] is None:
        return "n/a"
    return f"max |dw| {group['max_abs_dw']:.3g}, churn {group['churn']:.2%}"


def _compare(check: str, group: dict, same: str, differ: str) -> str:
    """The verdict on a group of replicas that should be identical, differ, or could not run; where
    they differ, the first op at which two of them part (`first_op`)."""
    if group["identical"] is None:
        return f"{check}: could not compare ({'; '.join(group['errors']) or 'fewer than 2 ok runs'})"
    where = f"; first differing op: {group['first_op']}" if group.get("first_op") else ""
    return f"{check}: {same if group['identical'] else differ + where}"


def first_op(pool: ProcessPoolExecutor, a: spec.RunSpec, b: spec.RunSpec) -> str:
    """Where runs a and b part, from a trace of each one's first optimiser step in `pool`'s process
    (orchestrator/diverge.py); a and b may be one spec, traced twice: run-to-run nondeterminism."""
    try:
        traces = [pool.submit(diverge.replay, r, 1).result() for r in (a, b)]
    except Exception as e:  # the finding stands without its op; say why the op is missing
        return f"not traced ({type(e).__name__}: {e})"
    return diverge.first_parting(*traces).describe()


def verdicts(report: dict) -> list[str]:
    """One line per finding, in the words a user acts on."""
    dev, out = report["device"], []
    if dev == "cpu":
        out.append(f"device: {report['device_note']}")
    impl, control, threads = (report["replicas"][k] for k in ("impl", "control", "threads"))
    n = threads["num_threads"][-1]
    out += [
        _compare("impl", impl, f"replicas with identical seeds are bitwise identical on {dev}: the default "
                 "kernels add no noise to small_cnn here",
                 f"replicas with identical seeds DIFFER bitwise on {dev} ({_spread(impl)}): the framework's "
                 "default kernels alone make runs differ here"),
        _compare("control", control, f"deterministic replicas are bitwise identical on {dev}: seeds plus "
                 "deterministic mode reproduce a run on this stack",
                 f"deterministic replicas DIFFER on {dev} ({_spread(control)}): determinism does not hold on "
                 "this stack; do not trust control groups here"),
        _compare("threads", threads, f"1 vs {n} intra-op threads give bitwise identical weights on this CPU "
                 "(small_cnn)", f"1 vs {n} intra-op threads CHANGE the weights on this CPU ({_spread(threads)}): "
                 "pin tooling.num_threads in sweeps and compare runs only at equal thread counts")]
    if report["cublas_workspace_before_cuda"] is False:
        out.append("cuBLAS: CUDA had started before CUBLAS_WORKSPACE_CONFIG could be set (something starts CUDA "
                   "at import): deterministic runs are not guaranteed on this node")
    elif report["cublas_workspace_before_cuda"]:
        out.append(f"cuBLAS: CUBLAS_WORKSPACE_CONFIG={noise.CUBLAS_WORKSPACE} was set before CUDA started")
    for o in report["overhead"]:
        if o["error"]:
            out.append(f"overhead {o['label']}: probe failed ({o['error']})")
            continue
        missing = o["nondeterministic_ops"]
        ops = f"; no deterministic kernel for {', '.join(missing)}" if missing else ""
        out.append(f"overhead {o['label']}: deterministic steps cost {_pct(o['overhead_pct'])} "
                   f"[{_pct(o['lo'])}, {_pct(o['hi'])}] on {o['device']}: {_breakdown(o)}{ops}")
    return out


def _differs(check: dict) -> bool | None:
    """Whether a replica check found different bits; None when it could not tell (a replica failed)."""
    return None if check["identical"] is None else not check["identical"]


# --- the command -----------------------------------------------------------------------------------

def overhead_table(overhead: list[dict]) -> str:
    """The probes as a markdown table: step times in ms, overhead and its parts in percent with
    their intervals."""
    lines = ["| workload | batch | image | step_ms_nondet | step_ms_det | overhead_pct | lo | hi | kernels | fill "
             "| no deterministic kernel |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for o in overhead:
        ms = [f"{o[k]:.2f}" if o.get(k) is not None else "n/a" for k in ("step_ms_nondet", "step_ms_det")]
        lines.append(f"| {o['label']} | {o['batch_size']} | {o['image_size']} | {ms[0]} | {ms[1]} | "
                     f"{_pct(o['overhead_pct'])} | {_pct(o['lo'])} | {_pct(o['hi'])} | {_part(o, 'kernels')} | "
                     f"{_part(o, 'fill')} | {', '.join(o['nondeterministic_ops']) or o['error'] or '-'} |")
    return "\n".join(lines)


def top_ops(overhead: list[dict]) -> list[str]:
    """One line per probe: the ops whose self time per step grows most in deterministic mode."""
    return [f"top ops {o['label']} (self ms per step, nondet -> det): "
            + ", ".join(f"{t['op']} {t['ms_nondet']:.2f} -> {t['ms_det']:.2f} ({t['delta_ms']:+.2f})"
                        for t in o["top_ops"]) for o in overhead if o["top_ops"]]


def _minutes(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of minutes (e.g. 2)")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m orchestrator.doctor", description=__doc__.split("\n\n")[1])
    p.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when torch sees a GPU, else cpu")
    p.add_argument("--minutes", type=_minutes, default=DEFAULT_MINUTES,
                   help=f"time budget (default {DEFAULT_MINUTES:g}); scales the probes' timed steps")
    p.add_argument("--json", metavar="PATH", help="also write the findings as JSON (local path or s3://...)")
    p.add_argument("--probes", metavar="SWEEP", help="probe this sweep's workloads with its overhead section "
                                                     "instead of the built-in small_cnn and resnet18")
    p.add_argument("--arch", help="with --probes: only these archs, comma-separated")
    return p.parse_args(argv)


def pick_device(requested: str | None) -> tuple[str, str]:
    """(device, note). Asks torch whether it sees a GPU; never starts CUDA in this process."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device cuda: torch {torch.__version__} (CUDA build {torch.version.cuda}) sees no "
                         "GPU on this machine; run with --device cpu or on a GPU node")
    if requested == "cpu":
        return "cpu", "CPU checks only (--device cpu)"
    if torch.cuda.is_available():
        return "cuda", "GPU checks"
    return "cpu", "no GPU that torch can use on this machine: CPU checks only"


def _worker() -> ProcessPoolExecutor:
    """A fresh process (spawned: nothing of this one's torch or CUDA state carries over)."""
    return ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))


def diagnose(device: str, note: str, minutes: float, probes_file: str | None, archs: list[str] | None) -> dict:
    threads = max(2, torch.get_num_threads())  # 1 vs N needs N > 1, even on a one-core box
    impl_specs, control_specs, thread_specs = replica_specs(device, threads)
    probes = probe_specs(device, minutes, probes_file, archs)
    with tempfile.TemporaryDirectory(prefix="doctor-") as out, _worker() as det, _worker() as default:
        impl_rows = [default.submit(runner.run, r, out) for r in impl_specs]  # beside the checks below
        started = det.submit(cuda_started).result()
        control = list(det.map(runner.run, control_specs, repeat(out)))
        fingerprint = {k: control[0].get(k) for k in probe.FINGERPRINT_COLUMNS}
        print("fingerprint:", json.dumps(fingerprint, indent=1, default=str), flush=True)
        cpu_rows = list(det.map(runner.run, thread_specs, repeat(out)))
        threads_summary = replica_summary(cpu_rows, out)
        if _differs(threads_summary):
            threads_summary["first_op"] = first_op(det, *thread_specs)
        impl = [f.result() for f in impl_rows]
        impl_summary = replica_summary(impl, out)
        if _differs(impl_summary):  # two replicas of one setting traced in turn
            impl_summary["first_op"] = first_op(default, impl_specs[0], impl_specs[0])
        overhead = []
        for p in probes:  # last, with nothing beside them: they time steps
            overhead.append(overhead_summary(p, det.submit(run_probe, p).result()))
            print(f"probe {p.workload.arch}: done", flush=True)
        replicas = {"impl": impl_summary, "control": replica_summary(control, out),
                    "threads": threads_summary}
    control_flags = [json.loads(r.get("impl_flags") or "{}") for r in control if r["status"] == "ok"]
    report = {
        "device": device, "device_note": note, "fingerprint": fingerprint,
        "impl_differs": _differs(replicas["impl"]), "control_identical": replicas["control"]["identical"],
        "threads_change_bits": _differs(replicas["threads"]),
        "cublas_workspace_before_cuda": None if device == "cpu" else (
            not started and bool(control_flags)
            and all(f.get("cublas_workspace_config") == noise.CUBLAS_WORKSPACE for f in control_flags)),
        "overhead": overhead, "replicas": replicas,
    }
    report["verdicts"] = verdicts(report)
    return report


def main(argv: list[str] | None = None) -> int:
    """0 every check ran; 1 some replica or probe failed (its error is in the verdicts and the JSON);
    2 bad usage, nothing run."""
    args = parse_args(argv)
    t0 = time.perf_counter()
    try:
        if args.arch and not args.probes:
            raise UsageError("--arch: only with --probes SWEEP; the built-in probes are small_cnn and resnet18")
        device, note = pick_device(args.device)
        print(f"doctor: {note}", flush=True)
        report = diagnose(device, note, args.minutes, args.probes, args.arch.split(",") if args.arch else None)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenProcessPool as e:  # a worker killed outright (segfault, out of host memory): no verdicts
        print(f"error: a doctor worker process died ({e}); no verdict was reached",
              file=sys.stderr)
        return 1
    report["wall_seconds"] = time.perf_counter() - t0
    print(overhead_table(report["overhead"]), "", *top_ops(report["overhead"]), "", *report["verdicts"], sep="\n")
    print(f"wall time: {report['wall_seconds']:.0f} s")
    if args.json:
        fs, path = store.resolve(args.json)
        store.write_bytes(fs, path, json.dumps(report, indent=1, default=str).encode())
        print(f"findings written to {path}")
    failed = any(g["errors"] for g in report["replicas"].values()) or any(o["error"] for o in report["overhead"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
