"""GPU evidence for the attention-kernel and world-size axes, through the sweep's own runner, without Ray.

    python docs/evidence/axes_check.py [--device cuda|cpu] [--json PATH]

- Attention: a small GPT on generated tokens (bf16 autocast: flash and cuDNN take no fp32 on a GPU)
  under each SDPA kernel (math, flash, efficient, cudnn), 2 `control` replicas in a deterministic
  process and 2 `impl` replicas in a default one: is each kernel offered here, are its replicas
  bitwise identical in each mode, and do kernels give other weights than each other.
- World size on one device: small_cnn on synthetic images at world size 1 and 2 (two processes,
  gloo, both ranks on the same device: NCCL refuses two ranks on one GPU), 2 `control` replicas
  each: are world-size-2 replicas identical, and does world size change the weights.

Modes run in fresh processes, as the sweep's worker pools do: CUDA reads CUBLAS_WORKSPACE_CONFIG
once, when it starts. Prints a table and writes the digests as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

KERNELS = ("math", "flash", "efficient", "cudnn")
GPT = {"arch": "gpt", "dataset": "synthetic_tokens", "arch_args": {"n_layer": 2, "n_head": 4, "n_embd": 128},
       "epochs": 1, "batch_size": 32, "lr": 1e-3, "optimizer": "adamw"}
CNN = {"arch": "small_cnn", "dataset": "synthetic", "epochs": 1, "batch_size": 64, "lr": 0.01,
       "dataset_args": {"n_train": 1024, "n_test": 256, "image_size": 32}}


def runs(noise: str, device: str, workload: dict, tooling: dict) -> list:
    from orchestrator import spec

    return spec.expand(spec.parse({"name": "axes-check", "replicas": 2, "noise": [noise], "workloads": [workload],
                                   "tooling": tooling, "resources": {"gpus": 1 if device == "cuda" else 0}}))


def attention_rows(noise: str, device: str, out: str) -> list[dict]:
    """Every kernel's replicas under one noise preset, in this (fresh) process."""
    from orchestrator import runner

    tooling = {"attention": list(KERNELS), "precision": ["bf16"]}
    return [{k: row.get(k) for k in ("attention", "replica", "status", "error", "weights_sha256",
                                     "attention_backend", "accelerator")}
            for r in runs(noise, device, GPT, tooling) for row in [runner.run(r, out)]]


def _rank(rank: int, spec_json: str, out: str, device: str, port: int) -> None:
    import torch
    import torch.distributed as dist

    from orchestrator import runner, spec
    from workloads.train import Rank

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    runner.run(spec.expanded(spec_json), out, Rank(rank, 2, rank, torch.device(device, 0) if device == "cuda"
                                                   else torch.device("cpu")))
    dist.destroy_process_group()


def world_size_rows(device: str, out: str) -> list[dict]:
    """control replicas at world size 1 (here) and 2 (two spawned ranks on the same device)."""
    import torch.multiprocessing as mp

    from orchestrator import runner, store

    rows = []
    for r in runs("control", device, CNN, {"world_size": [1, 2]}):
        if r.world_size == 1:
            row = runner.run(r, out)
        else:
            mp.spawn(_rank, args=(r.model_dump_json(), out, device, 29400 + r.replica), nprocs=2, join=True)
            row = store.read_runs(out).to_pandas().set_index("run_id").loc[r.run_id].to_dict()
        rows.append({k: row.get(k) for k in ("world_size", "replica", "status", "error", "weights_sha256",
                                             "dist_backend")})
    return rows


def in_fresh_process(fn, *args):
    with ProcessPoolExecutor(1, mp_context=__import__("multiprocessing").get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def verdicts(attention: dict[str, list[dict]], world: list[dict]) -> list[str]:
    lines = []
    for kernel in KERNELS:
        per_mode = {noise: [r for r in rows if r["attention"] == kernel] for noise, rows in attention.items()}
        if any(r["status"] != "ok" for rows in per_mode.values() for r in rows):
            first = next(r["error"] for rows in per_mode.values() for r in rows if r["status"] != "ok")
            lines.append(f"attention {kernel}: not run here: {first}")
            continue
        same = {noise: len({r["weights_sha256"] for r in rows}) == 1 for noise, rows in per_mode.items()}
        lines.append(f"attention {kernel}: control replicas {'identical' if same['control'] else 'DIFFER'}, "
                     f"impl replicas {'identical' if same['impl'] else 'DIFFER'} "
                     f"(ran {per_mode['control'][0]['attention_backend']})")
    control = {r["attention"]: r["weights_sha256"] for r in attention["control"] if r["status"] == "ok"}
    lines.append(f"attention kernels under control: {len(set(control.values()))} distinct weights over "
                 f"{len(control)} kernels ({', '.join(sorted(control))})")
    by_size = {k: {r["weights_sha256"] for r in world if r["world_size"] == k and r["status"] == "ok"} for k in (1, 2)}
    lines.append(f"world size 2 on one device (gloo): control replicas "
                 f"{'identical' if len(by_size[2]) == 1 else 'DIFFER'}; world size 1 vs 2 "
                 f"{'identical' if by_size[1] == by_size[2] else 'differ'}")
    return lines


def main() -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="write the digests and verdicts here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as out:
        attention = {noise: in_fresh_process(attention_rows, noise, args.device, f"{out}/{noise}")
                     for noise in ("control", "impl")}
        world = in_fresh_process(world_size_rows, args.device, f"{out}/world")
    lines = verdicts(attention, world)
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps({"attention": attention, "world_size": world, "verdicts": lines},
                                              indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
