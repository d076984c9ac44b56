"""The determinism-overhead probe on this CPU: does it measure kernels, not artefacts?

    python bench/bench_probe.py [REPEATS]

A CPU runs the same kernels with and without `torch.use_deterministic_algorithms(True)`, so with
torch's NaN-fill of uninitialised memory left off (`fill_uninitialized_memory: false`) the two modes
do identical work and the probe must report an overhead near 0% with an interval that covers 0.
With the fill on (torch's default deterministic mode, what a deterministic replica really runs),
the det blocks also memset every new tensor: a real cost the probe should find. Both settings run
for small_cnn and resnet18 on small synthetic data, side by side in one process, and the reducer's
overhead table (median det / median nondet - 1, block-bootstrap 95% interval) is printed for each.
"""

import sys
import tempfile
import time

import pandas as pd

from orchestrator import probe, reduce, spec, store

REPEATS = int(sys.argv[1]) if len(sys.argv) > 1 else 15
WORKLOADS = [  # a few thousand images would not change a step; small data keeps set-up short
    {"arch": "small_cnn", "dataset": "synthetic", "batch_size": 128, "augmentation": "crop+flip",
     "dataset_args": {"n_train": 1024, "n_test": 64, "image_size": 32}},
    {"arch": "resnet18", "dataset": "synthetic", "batch_size": 16, "augmentation": "crop+flip",
     "dataset_args": {"n_train": 256, "n_test": 64, "image_size": 16}},
]
STEPS = {"small_cnn": (8, 2), "resnet18": (4, 1)}  # (timed, warm-up) steps per block: short blocks, many alternations


def probes(fill: bool) -> list[spec.ProbeSpec]:
    out = []
    for w in WORKLOADS:
        steps, warmup = STEPS[w["arch"]]
        # 1 thread: a 2-core machine shared with Ray and other processes
        doc = {"name": "bench-probe", "noise": [], "tooling": {"num_threads": [1]},
               "overhead": {"steps": steps, "warmup": warmup, "repeats": REPEATS, "fill_uninitialized_memory": fill},
               "workloads": [w]}
        out += spec.expand_probes(spec.parse(doc))
    return out


def main() -> None:
    tables = {}
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        for p_kernels, p_default in zip(probes(False), probes(True)):  # interleaved: same machine state
            for fill, p in ((False, p_kernels), (True, p_default)):
                result = probe.run(p, f"{d}/fill-{fill}")
                assert result["status"] == "ok", result
        for fill in (False, True):
            t = reduce.overhead_table(*store.resolve(f"{d}/fill-{fill}"))
            tables[fill] = t.assign(fill_uninitialized_memory=fill)
        elapsed = time.perf_counter() - t0
    cols = ["arch", "fill_uninitialized_memory", "step_ms_nondet", "step_ms_det", "overhead_pct", "overhead_lo",
            "overhead_hi", "n_steps", "nondeterministic_ops"]
    table = pd.concat(tables.values(), ignore_index=True)[cols].sort_values(["arch", "fill_uninitialized_memory"])
    print(f"probe on the CPU, 1 thread, {REPEATS} det/nondet block pairs per probe, total {elapsed:.0f} s")
    print(reduce.format_markdown(table))
    kernels = tables[False]
    covers = ((kernels.overhead_lo <= 0) & (kernels.overhead_hi >= 0)).all()
    print(f"same kernels (fill off): interval covers 0 for every arch: {bool(covers)}; "
          f"max |overhead| {kernels.overhead_pct.abs().max():.1f}%")


if __name__ == "__main__":
    main()
