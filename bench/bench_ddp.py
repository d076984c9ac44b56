"""What a data-parallel replica costs: world size 2 through the orchestrator (Ray Tune trial ->
a warm group of 2 rank processes with a gloo process group) versus a bare torch.multiprocessing +
DistributedDataParallel loop of the same model, data and steps.

    python bench/bench_ddp.py [REPLICAS]   (default 5, ~3 minutes on 2 cores)

Orchestrator side: one `python -m orchestrator.sweep` (its main, on a running local cluster) of
REPLICAS replicas at world_size 2, 1 CPU and 1 thread per rank, noise `impl` (every replica has the
same seeds); a replica's wall is the time between consecutive replicas' rows being written (the
first: from the sweep's start, so it holds Tune's trial start and the rank group's start-up), its
training time the row's `epoch_seconds`. Bare side: REPLICAS runs of two processes started by
torch.multiprocessing, gloo on 127.0.0.1, the same seeds, the same shard of each epoch's permutation
per rank (every other example, batch 64 / 2), DDP's gradient averaging, rank 0 timing each epoch
with perf_counter as the harness does; its wall holds the process start and the process group.
Both sides reproduce the same final weights (digest compared), so they do the same arithmetic.
Goals (issue #30): each replica after the first <= 1 s over its training time; median epoch
orchestrator / bare <= 1.15 (a 95% jackknife interval leaving out whole replicas).
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from orchestrator import fingerprint, metrics, runner, spec, store, sweep  # noqa: E402
from workloads import data as datasets  # noqa: E402
from workloads import models  # noqa: E402

WORLD = 2
DOC = {"name": "bench-ddp", "replicas": 1, "noise": ["impl"], "tooling": {"num_threads": [1], "world_size": [WORLD]},
       "resources": {"cpus": 1},
       "workloads": [{"arch": "small_cnn", "dataset": "synthetic", "epochs": 3, "batch_size": 64, "lr": 0.01,
                      "optimizer": "sgd", "momentum": 0.9, "dataset_args": {"n_train": 2048, "n_test": 256,
                                                                            "image_size": 32}}]}


def orchestrated(tmp: Path, replicas: int) -> tuple[list[float], list[list[float]], set[str]]:
    """REPLICAS world-size-2 replicas in one sweep: each replica's wall, its epoch seconds, the digests."""
    (tmp / "s.yaml").write_text(yaml.safe_dump(DOC | {"replicas": replicas}))
    out = tmp / "orch"
    t0 = time.time()
    assert sweep.main([str(tmp / "s.yaml"), "--out", str(out)]) == 0
    rows = sorted(store.read_runs(str(out), columns=["run_id", "epoch_seconds", "weights_sha256"]).to_pylist(),
                  key=lambda r: os.stat(store.run_path(str(out), r["run_id"])).st_mtime)
    done = [t0] + [os.stat(store.run_path(str(out), r["run_id"])).st_mtime for r in rows]
    return [b - a for a, b in zip(done, done[1:])], [r["epoch_seconds"] for r in rows], \
        {r["weights_sha256"] for r in rows}


def bare_rank(rank: int, port: int, result: str) -> None:
    """One rank of the bare loop: the replica's seeds, its shard of each permutation, DDP."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    (run,) = spec.expand(spec.parse(DOC))
    w = run.workload
    data = datasets.load(w.dataset, w.dataset_root, **w.dataset_args)
    torch.manual_seed(run.seeds.init)
    model = models.build(w.arch, data.input_shape, data.num_classes)
    net = torch.nn.parallel.DistributedDataParallel(model)
    torch.manual_seed(run.seeds.for_rank(rank).global_rng)
    order = torch.Generator().manual_seed(run.seeds.order)
    opt = torch.optim.SGD(model.parameters(), lr=w.lr, momentum=w.momentum)
    x, y, per_rank = data.train_x, data.train_y, w.batch_size // WORLD
    seconds = []
    for _ in range(w.epochs):
        t0 = time.perf_counter()
        net.train()
        perm = torch.randperm(len(x), generator=order)
        mine = perm[:len(perm) - len(perm) % WORLD][rank::WORLD]
        for i in range(0, len(mine), per_rank):
            idx = mine[i:i + per_rank]
            loss = F.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        seconds.append(time.perf_counter() - t0)
    if rank == 0:
        digest, _ = runner.weights_digest({k: v.detach() for k, v in model.state_dict().items()})
        Path(result).write_text(json.dumps([seconds, digest]))
    dist.destroy_process_group()


def bare(tmp: Path, k: int) -> tuple[float, list[float], str]:
    """One bare run: its wall (process start, process group, training), epoch seconds and digest."""
    result = tmp / f"bare{k}.json"
    t0 = time.perf_counter()
    mp.spawn(bare_rank, args=(29500 + k, str(result)), nprocs=WORLD, join=True)
    wall = time.perf_counter() - t0
    seconds, digest = json.loads(result.read_text())
    return wall, seconds, digest


def main() -> None:
    import ray

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("replicas", nargs="?", type=int, default=5)
    args = parser.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    with tempfile.TemporaryDirectory() as d:
        walls, epochs, digests = orchestrated(Path(d), args.replicas)
        ray.shutdown()
        bare_runs = [bare(Path(d), k) for k in range(args.replicas)]
    digests |= {digest for _, _, digest in bare_runs}
    w = DOC["workloads"][0]
    print(f"{w['arch']} on {w['dataset']} ({w['dataset_args']['n_train']} x 3x32x32), global batch {w['batch_size']}, "
          f"world size {WORLD} (gloo, 1 CPU and 1 thread per rank), {w['epochs']} epochs, {args.replicas} replicas "
          f"a side; {fingerprint.cpu_model()}, load average {os.getloadavg()[0]:.1f}")
    train = [sum(s) for s in epochs]
    print(f"{'':28} {'wall s':>8} {'training s':>11} {'wall - training':>16}")
    print(f"{'orchestrator, 1st replica':28} {walls[0]:8.2f} {train[0]:11.2f} {walls[0] - train[0]:16.2f}")
    rest = [a - b for a, b in zip(walls[1:], train[1:])]
    print(f"{'orchestrator, others (median)':28} {statistics.median(walls[1:]):8.2f} "
          f"{statistics.median(train[1:]):11.2f} {statistics.median(rest):16.2f}  (goal <= 1 s)")
    print(f"{'bare DDP loop (median)':28} {statistics.median(b[0] for b in bare_runs):8.2f} "
          f"{statistics.median(sum(b[1]) for b in bare_runs):11.2f} "
          f"{statistics.median(b[0] - sum(b[1]) for b in bare_runs):16.2f}")
    ratio, lo, hi = metrics.median_ratio_ci(epochs[1:], [b[1] for b in bare_runs])
    print(f"median epoch orchestrator / bare: {ratio:.3f} [{lo:.3f}, {hi:.3f}] (goal <= 1.15); "
          f"replica wall after the first / bare wall: "
          f"{statistics.median(walls[1:]) / statistics.median(b[0] for b in bare_runs):.2f}; "
          f"final weights {'identical on both sides' if len(digests) == 1 else f'DIFFER ({len(digests)} digests)'}")


if __name__ == "__main__":
    main()
