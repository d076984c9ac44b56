"""What a data-parallel replica costs per epoch: world size 2 through the orchestrator (Ray Tune
trial -> Ray Train, 2 workers, gloo) versus a bare torch.multiprocessing + DistributedDataParallel
loop of the same model, data and steps.

    python bench/bench_ddp.py [ROUNDS]   (default 4 rounds, ~5 minutes on 2 cores)

Orchestrator side: `python -m orchestrator.sweep`'s main on a one-replica spec at world_size 2, 1 CPU
and 1 thread per rank; epoch times are rank 0's, from the row's `epoch_seconds`. Bare side: two
processes started by torch.multiprocessing, gloo on 127.0.0.1, the same seeds, the same shard of each
epoch's permutation per rank (every other example, batch 64 / 2), DDP's gradient averaging, rank 0
timing each epoch with perf_counter as the harness does. Both sides reproduce the same final
weights (digest compared), so they do the same arithmetic. Rounds alternate which side goes first.
Goal: orchestrator / bare <= 1.15, the ratio of median epoch times with a 95% jackknife interval
that leaves out whole runs (the reducer's `median_ratio_ci`); start-up (Ray Train's worker group,
the process group) is outside the epochs on both sides.
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


def orchestrated(tmp: Path, k: int) -> tuple[list[float], str]:
    """One world-size-2 replica through the orchestrator: rank 0's epoch seconds and the weights digest."""
    (tmp / "s.yaml").write_text(yaml.safe_dump(DOC))
    out = tmp / f"orch{k}"
    assert sweep.main([str(tmp / "s.yaml"), "--out", str(out)]) == 0
    row = store.read_runs(str(out), columns=["epoch_seconds", "weights_sha256"]).to_pylist()[0]
    return row["epoch_seconds"], row["weights_sha256"]


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


def bare(tmp: Path, k: int) -> tuple[list[float], str]:
    result = tmp / f"bare{k}.json"
    mp.spawn(bare_rank, args=(29500 + k, str(result)), nprocs=WORLD, join=True)
    return tuple(json.loads(result.read_text()))


def main() -> None:
    import ray

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rounds", nargs="?", type=int, default=4)
    args = parser.parse_args()
    # with the dashboard: Ray Train's placement-group cleaner asks the State API (see sweep.connect)
    ray.init(num_cpus=2, include_dashboard=True, logging_level="WARNING")
    sides = {"orchestrator": orchestrated, "bare": bare}
    runs = {name: [] for name in sides}  # interval units: one array of epoch times per run
    digests = set()
    with tempfile.TemporaryDirectory() as d:
        for k in range(args.rounds):
            for name in (list(sides) if k % 2 == 0 else list(sides)[::-1]):
                seconds, digest = sides[name](Path(d), k)
                runs[name].append(seconds)
                digests.add(digest)
    ray.shutdown()
    w = DOC["workloads"][0]
    print(f"{w['arch']} on {w['dataset']} ({w['dataset_args']['n_train']} x 3x32x32), global batch {w['batch_size']}, "
          f"world size {WORLD} (gloo, 1 CPU and 1 thread per rank), {w['epochs']} epochs x {args.rounds} rounds "
          "a side; "
          f"{fingerprint.cpu_model()}, load average {os.getloadavg()[0]:.1f}")
    for name, units in runs.items():
        print(f"{name:13} median epoch {statistics.median(s for u in units for s in u):.3f} s")
    ratio, lo, hi = metrics.median_ratio_ci(runs["orchestrator"], runs["bare"])
    print(f"ratio orchestrator / bare: {ratio:.3f} [{lo:.3f}, {hi:.3f}] (goal <= 1.15); "
          f"final weights {'identical on both sides' if len(digests) == 1 else f'DIFFER ({len(digests)} digests)'}")


if __name__ == "__main__":
    main()
