"""Harness overhead of the framework adapters: each example run through `runner.run` (control preset,
adapters, ctx.report, the row and weights written) against the same framework run directly (the
same model, data and Trainer settings, no harness), side by side in one process, rounds interleaved.

    python bench/bench_integrations.py [--epochs 4] [--rounds 3] [--frameworks hf,lightning]

Prints, per framework, the median epoch time of each and their ratio (harness / direct). The first
epoch of every run is left out (it holds the harness's setup in one and not the other). Goal: a
ratio near 1: the adapters add seeding and a callback per epoch, nothing per step.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from orchestrator import runner  # noqa: E402
from orchestrator.spec import expand, parse  # noqa: E402

WORKLOADS = {"hf": {"entrypoint": "examples.hf_trainer:main", "name": "tiny_bert", "dataset": "sequences"},
             "lightning": {"entrypoint": "examples.lightning_module:main", "name": "digits_lit",
                           "dataset": "sklearn_digits"}}


def epoch_gaps(stamps: list[float]) -> list[float]:
    """Seconds between consecutive epoch ends, the first epoch left out."""
    return [b - a for a, b in zip(stamps, stamps[1:])]


def hf_direct(epochs: int, out: str) -> list[float]:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from examples.hf_trainer import Sequences, make_model

    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_epoch_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())

    torch.manual_seed(0)
    model = make_model()
    args = TrainingArguments(output_dir=out, num_train_epochs=epochs, per_device_train_batch_size=32,
                             per_device_eval_batch_size=128, learning_rate=3e-3, seed=1, data_seed=2,
                             full_determinism=True, use_cpu=True, report_to="none", save_strategy="no",
                             disable_tqdm=True, logging_strategy="epoch")
    trainer = Trainer(model=model, args=args, train_dataset=Sequences(256, seed=0), callbacks=[Stamp()])
    trainer.train()
    trainer.predict(Sequences(128, seed=1))
    return epoch_gaps(stamps)


def lightning_direct(epochs: int, out: str) -> list[float]:
    import lightning as L
    from torch.utils.data import DataLoader

    from examples.lightning_module import DigitsModule, Recorded

    stamps: list[float] = []

    class Stamp(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            stamps.append(time.perf_counter())

    L.seed_everything(0, verbose=False)
    module = DigitsModule(0.05)
    train = DataLoader(Recorded(train=True, shift=True), batch_size=64, shuffle=True)
    trainer = L.Trainer(max_epochs=epochs, deterministic=True, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[Stamp()], default_root_dir=out)
    trainer.fit(module, train)
    return epoch_gaps(stamps)


DIRECT = {"hf": hf_direct, "lightning": lightning_direct}


def harness(framework: str, epochs: int, out: str) -> list[float]:
    spec = parse({"name": "bench", "replicas": 1, "noise": ["control"],
                  "workloads": [WORKLOADS[framework] | {"args": {"epochs": epochs}}]})
    row = runner.run(expand(spec)[0], out)
    if row["status"] != "ok":
        sys.exit(f"{framework}: the harness run failed: {row['error']}")
    return row["epoch_seconds"][1:]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--frameworks", default="hf,lightning")
    a = p.parse_args(argv)
    torch.set_num_threads(1)  # the harness's default thread count: both sides alike
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    print(next((line for line in cpu.splitlines() if "Model name" in line), "cpu: unknown"))
    print(f"load before: {os.getloadavg()}  epochs {a.epochs}, rounds {a.rounds}, first epoch of each run left out")
    print(f"{'framework':10} {'direct s/epoch':>15} {'harness s/epoch':>16} {'ratio':>7}")
    for framework in a.frameworks.split(","):
        direct, harnessed = [], []
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(a.rounds):  # interleaved: drift in the machine's load hits both sides
                direct += DIRECT[framework](a.epochs, f"{tmp}/direct{r}")
                harnessed += harness(framework, a.epochs, f"{tmp}/harness")
        d, h = statistics.median(direct), statistics.median(harnessed)
        print(f"{framework:10} {d:15.4f} {h:16.4f} {h / d:7.3f}")
    print(f"load after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
