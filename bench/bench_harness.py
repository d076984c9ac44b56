"""What the orchestrator costs per epoch: one replica through the whole stack versus the same
model, data and steps in a bare PyTorch loop.

    python bench/bench_harness.py [ROUNDS] [--workload small_cnn|gpt]   (default 6 rounds of small_cnn, ~6 minutes)

Workloads: `small_cnn` on 4,096 synthetic 32×32 images (SGD); `gpt`, the built-in GPT (2 blocks of
width 128, scaled_dot_product_attention) on this repository's README.md as character-level text in
windows of 64 (AdamW).

Orchestrator side: `python -m orchestrator.sweep`'s main on a one-replica spec (Ray Tune trial ->
worker -> runner -> workloads.train), its epoch times read from the row's `epoch_seconds`. Bare
side: a hand-written loop in a fresh Python process, same thread count (1, as the trial runs), same
seeds, timed the same way (perf_counter around each epoch), run twice: as written, and with the
malloc setting the orchestrator's workers use (orchestrator/malloc.py), which separates what the
harness costs from what that setting saves. The bare loop reproduces the replica bit for bit (same
final weights digest), so every side does exactly the same arithmetic. Rounds rotate the order of
the three sides so that a busy neighbour on this shared 2-core machine hits them alike.
Goal: orchestrator / bare <= 1.05. The ratio of median epoch times comes with a 95% jackknife
interval that leaves out whole runs (the reducer's `median_ratio_ci`): on a shared machine epoch
times swing by +-15% with the neighbours' load, and one round proves nothing.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from orchestrator import malloc, metrics, runner, spec, store, sweep  # noqa: E402
from workloads import data as datasets  # noqa: E402
from workloads import models  # noqa: E402

EPOCHS = 3
# noise "impl": torch's default (non-deterministic) mode, as in the bare loop; seeds are fixed as in
# control. Under control the replica would also pay deterministic mode's NaN fill of every new
# tensor (bench/bench_probe.py measures that), which is a setting, not harness overhead.
SPEC = {"name": "bench-harness", "replicas": 1, "noise": ["impl"], "tooling": {"num_threads": [1]},
        "resources": {"cpus": 1}}
WORKLOADS = {
    "small_cnn": {"arch": "small_cnn", "dataset": "synthetic", "epochs": EPOCHS, "batch_size": 128,
                  "lr": 0.01, "optimizer": "sgd", "momentum": 0.9,
                  "dataset_args": {"n_train": 4096, "n_test": 256, "image_size": 32}},
    "gpt": {"arch": "gpt", "dataset": "text", "dataset_root": str(ROOT / "README.md"), "epochs": EPOCHS,
            "batch_size": 32, "lr": 1e-3, "optimizer": "adamw", "weight_decay": 0.1,
            "dataset_args": {"context_length": 64}},
}
DESCRIBED = {"small_cnn": "small_cnn, synthetic 4096 x 3x32x32, batch 128, SGD",
             "gpt": "gpt (2 x 128), README.md as characters in windows of 64, batch 32, AdamW"}


def doc(workload: str) -> dict:
    return SPEC | {"workloads": [WORKLOADS[workload]]}


def orchestrated(tmp: Path, k: int, workload: str) -> tuple[list[float], str]:
    """One replica through the orchestrator; its per-epoch seconds and weights digest."""
    (tmp / "s.yaml").write_text(yaml.safe_dump(doc(workload)))
    out = tmp / f"orch{k}"
    assert sweep.main([str(tmp / "s.yaml"), "--out", str(out)]) == 0
    row = store.read_runs(str(out), columns=["epoch_seconds", "weights_sha256"]).to_pylist()[0]
    return row["epoch_seconds"], row["weights_sha256"]


def bare(workload: str) -> tuple[list[float], str]:
    """The same replica as a plain PyTorch loop: same seeds, data on the device, no harness. Logits
    (B, C) or (B, T, V) and targets (B,) or (B, T) are flattened to rows for the loss."""
    (run,) = spec.expand(spec.parse(doc(workload)))
    w = run.workload
    torch.set_num_threads(1)
    data = datasets.load(w.dataset, w.dataset_root, **w.dataset_args)
    torch.manual_seed(run.seeds.init)
    model = models.build(w.arch, data.input_shape, data.num_classes)
    torch.manual_seed(run.seeds.global_rng)
    order = torch.Generator().manual_seed(run.seeds.order)
    if w.optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=w.lr, weight_decay=w.weight_decay)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=w.lr, momentum=w.momentum)
    x, y = data.train_x, data.train_y
    seconds = []
    for _ in range(w.epochs):
        t0 = time.perf_counter()
        model.train()
        perm = torch.randperm(len(x), generator=order)
        for i in range(0, len(x), w.batch_size):
            idx = perm[i:i + w.batch_size]
            loss = F.cross_entropy(model(x[idx]).flatten(0, -2), y[idx].flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        seconds.append(time.perf_counter() - t0)
    digest, _ = runner.weights_digest({k: v.detach() for k, v in model.state_dict().items()})
    return seconds, digest


def bare_in_fresh_process(workload: str, keep_freed_memory: bool) -> tuple[list[float], str]:
    cmd = [sys.executable, __file__, "--bare", "--workload", workload] + (["--malloc"] if keep_freed_memory else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return tuple(json.loads(out.strip().splitlines()[-1]))


def main() -> None:
    import ray

    args = argparse.ArgumentParser()
    args.add_argument("rounds", nargs="?", type=int, default=6)
    args.add_argument("--workload", choices=sorted(WORKLOADS), default="small_cnn")
    args.add_argument("--bare", action="store_true", help="internal: run the bare loop, print JSON")
    args.add_argument("--malloc", action="store_true", help="internal: with the workers' malloc setting")
    args = args.parse_args()
    if args.bare:
        if args.malloc:
            assert malloc.keep_freed_memory()
        print(json.dumps(bare(args.workload)))
        return
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    w = args.workload
    sides = {"orchestrator": lambda tmp, k: orchestrated(tmp, k, w),  # each side: (folder, round) -> run
             "bare": lambda tmp, k: bare_in_fresh_process(w, False),
             "bare+malloc": lambda tmp, k: bare_in_fresh_process(w, True)}
    epochs = {name: [] for name in sides}
    runs = {name: [] for name in sides}  # interval units: one array of epoch times per run
    with tempfile.TemporaryDirectory() as d:
        for k in range(args.rounds):
            names = list(sides)[k % 3:] + list(sides)[:k % 3]
            digests = {}
            for name in names:
                seconds, digests[name] = sides[name](Path(d), k)
                epochs[name] += seconds
                runs[name].append(seconds)
            assert len(set(digests.values())) == 1, f"not the same arithmetic: {digests}"
            print("round {}: {}".format(k, "; ".join(
                f"{n} {statistics.median(epochs[n][-EPOCHS:]):.3f} s" for n in names)), flush=True)
    ray.shutdown()
    med = {n: statistics.median(v) for n, v in epochs.items()}
    print(f"workload: {DESCRIBED[args.workload]}, 1 thread, {EPOCHS} epochs x "
          f"{args.rounds} rounds per side; final weights bitwise equal on all sides: yes")
    print("median epoch: " + ", ".join(f"{n} {v:.3f} s" for n, v in med.items()))
    for other, what in (("bare", "goal <= 1.05"), ("bare+malloc", "the harness alone")):
        ratio, lo, hi = metrics.median_ratio_ci(runs["orchestrator"], runs[other])
        verdict = f"; {'met' if ratio <= 1.05 else 'NOT met'}" if other == "bare" else ""
        print(f"per-epoch time ratio orchestrator / {other}: {ratio:.3f}  95% interval [{lo:.3f}, {hi:.3f}]"
              f"  ({what}{verdict})")


if __name__ == "__main__":
    main()
