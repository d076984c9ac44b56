"""Benchmark: what tracing a step costs, and what the per-epoch weights digest and sketch cost.

    .venv/bin/python bench/bench_diverge.py [--arch small_cnn] [--dataset digits] [--epochs 3] [--steps 5]

On one workload of the sweep (default: the default sweep's small_cnn on digits, Adam, batch 32),
side by side in one process:
- trace: the median time of one training step under `orchestrator.diverge.Tracer` over the
  median time of the same step untraced (the replay runs a few steps, so a large ratio is fine);
- sketch: the median time of the per-epoch record (`runner.epoch_recorder`: weights digest and
  sketch) over the median epoch time. Goal: at most 1% of an epoch.
Prints the CPU model and the load beside the figures (timings on a shared machine are noisy).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from orchestrator import runner, spec  # noqa: E402
from orchestrator.diverge import Tracer  # noqa: E402
from workloads.train import make_optimizer, prepare, train_epoch, train_step  # noqa: E402


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="small_cnn")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3, help="epochs timed (median taken)")
    parser.add_argument("--steps", type=int, default=5, help="steps timed, traced and not (median taken)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    run = spec.expand(spec.parse({"name": "bench", "replicas": 1, "noise": ["control"], "workloads": [
        {"arch": args.arch, "dataset": args.dataset, "epochs": args.epochs, "batch_size": args.batch_size,
         "lr": 0.002, "optimizer": "adam"}]}))[0]
    data, model, cfg = runner.build_workload(run)
    device = torch.device("cpu")
    net = prepare(model, cfg, device)
    opt = make_optimizer(model, cfg)
    x, y = data.train_x[: cfg.batch_size], data.train_y[: cfg.batch_size]

    def step() -> None:
        train_step(net, opt, x, y, cfg)

    ops = []

    def traced_step() -> None:
        with Tracer() as t:
            step()
        ops.append(len(t.records))

    step()  # warm-up
    plain = median_seconds(step, args.steps)
    traced = median_seconds(traced_step, args.steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    g = torch.Generator().manual_seed(0)

    def epoch() -> None:
        perm = torch.randperm(len(data.train_x), generator=g)
        batches = ((data.train_x[i], data.train_y[i]) for i in perm.split(cfg.batch_size))
        train_epoch(net, opt, schedule, batches, cfg, device)

    record, columns = runner.epoch_recorder(runner.buffer_names(model))
    record(model)  # the first call also draws the projection: counted apart below
    epoch_s = median_seconds(epoch, args.epochs)
    record_s = median_seconds(lambda: record(model), max(args.epochs, 5))
    first = time.perf_counter()
    runner.sketch_plan(model.state_dict())
    plan_s = time.perf_counter() - first
    n = sum(p.numel() for p in model.parameters())
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               "?")
    print(f"{args.arch} on {args.dataset}, {n:,} parameters, batch {cfg.batch_size}, 1 thread, "
          f"torch {torch.__version__}")
    print(f"cpu: {cpu}; {os.cpu_count()} cores; load: {load}")
    print(f"trace : step {plain * 1e3:8.2f} ms untraced, {traced * 1e3:8.2f} ms traced ({ops[0]} ops)"
          f"  ratio {traced / plain:6.1f}x")
    print(f"sketch: epoch {epoch_s * 1e3:8.1f} ms, per-epoch record {record_s * 1e3:6.2f} ms"
          f"  ratio {record_s / epoch_s:.2%} of an epoch (goal <= 1%); drawing the projection once: "
          f"{plan_s * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
