"""The sources table on generated results trees with known answers, the share intervals'
coverage, the bit-flip preset, and an end-to-end sweep of every single-source preset."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from orchestrator import metrics, noise, reduce, store

TRUE_STD = {"init": 0.004, "order": 0.006, "augment": 0.005, "impl": 0.003, "algo+impl": 0.009}
FLIP = {"init": 0.05, "order": 0.08, "augment": 0.06, "impl": 0.03, "algo+impl": 0.1}  # per-example flip rate


def write_tree(root, stds: dict[str, float], flips: dict[str, float], n: int, seed: int = 0, n_test: int = 40,
               control: bool = True) -> None:
    """A results tree as the runner writes it (rows only, no weights): per preset, n replicas whose
    accuracy is 0.9 + N(0, std²) and whose predictions flip each example of one fixed model with
    the preset's rate. `control` adds a preset whose replicas are all identical."""
    rng = np.random.default_rng(seed)
    fs, r = store.resolve(str(root))
    base = rng.integers(0, 10, n_test)
    presets = {**stds, **({"control": 0.0} if control else {})}
    for name, std in presets.items():
        for i in range(n):
            flip = rng.random(n_test) < flips.get(name, 0.0)
            preds = np.where(flip, (base + 1 + rng.integers(0, 9, n_test)) % 10, base)
            store.write_run(fs, r, {
                "run_id": f"{name}-{i}", "sweep": "t", "arch": "mlp", "dataset": "toy", "noise": name,
                "replica": i, "seed_init": i, "seed_order": i, "seed_augment": i, "accelerator_requested": "any",
                "accelerator": "cpu", "fingerprint_id": "fp0", "num_threads": 1, "precision": "fp32",
                "channels_last": False, "compiled": False, "status": "ok", "epochs": 1,
                "spec_json": json.dumps({"workload": {"arch": "mlp", "dataset": "toy"}}),
                "test_accuracy": 0.9 + std * rng.standard_normal(), "predictions": preds.tolist()})
