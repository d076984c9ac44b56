"""The determinism-overhead probe on this CPU: does it measure kernels, not artefacts, and what does
the probe itself cost?

    python bench/bench_probe.py [REPEATS]

A CPU runs the same kernels with and without `torch.use_deterministic_algorithms(True)`, so the
kernels part (det_nofill over nondet) must come out near 0% with an interval that covers 0, while
the fill part (det over det_nofill: torch's NaN fill of every new tensor) is a real cost the probe
should find. Each workload (small_cnn and resnet18 on small synthetic data) is probed twice, side
by side in one process: with the fill mode (three modes, the default) and without it
(`fill_uninitialized_memory: false`, two modes). Printed per probe: the reducer's overhead row, the
probe's own cost (its wall time, with building, warm-up, resets, the two profiled blocks and the
writes, over the time its timed steps took) and the op that grows most; then what the third mode
costs (wall time of the three-mode probe over the two-mode one's).
"""

import sys
import tempfile
import time

import pandas as pd

from orchestrator import probe, reduce, spec, store

REPEATS = int(sys.argv[1]) if len(sys.argv) > 1 else 6  # two rotations of three modes
WORKLOADS = [  # a few thousand images would not change a step; small data keeps set-up short
    {"arch": "small_cnn", "dataset": "synthetic", "batch_size": 128, "augmentation": "crop+flip",
     "dataset_args": {"n_train": 1024, "n_test": 64, "image_size": 32}},
    {"arch": "resnet18", "dataset": "synthetic", "batch_size": 16, "augmentation": "crop+flip",
     "dataset_args": {"n_train": 256, "n_test": 64, "image_size": 16}},
]
STEPS = {"small_cnn": (8, 2), "resnet18": (4, 1)}  # (timed, warm-up) steps per block: short blocks, many rounds


def probe_spec(w: dict, fill: bool) -> spec.ProbeSpec:
    steps, warmup = STEPS[w["arch"]]
    # 1 thread: a 2-core machine shared with Ray and other processes
    doc = {"name": "bench-probe", "noise": [], "tooling": {"num_threads": [1]},
           "overhead": {"steps": steps, "warmup": warmup, "repeats": REPEATS, "fill_uninitialized_memory": fill},
           "workloads": [w]}
    (p,) = spec.expand_probes(spec.parse(doc))
    return p


def timed(p: spec.ProbeSpec, out: str) -> dict:
    """One probe: its overhead row, wall time and timed-step time, and its top op."""
    t0 = time.perf_counter()
    assert probe.run(p, out)["status"] == "ok"
    wall = time.perf_counter() - t0
    fs, root = store.resolve(out)
    steps = pd.read_parquet(store.overhead_path(root, p.probe_id))
    row = reduce.overhead_table(fs, root).iloc[0]
    top = reduce.overhead_ops_table(fs, root).iloc[0]
    spent = steps["step_ms"].sum() / 1e3
    return {"arch": p.workload.arch, "modes": len(probe.modes(p)), "overhead_pct": row["overhead_pct"],
            **{c: row[c] for c in reduce.OVERHEAD if c.startswith(("overhead_kernels", "overhead_fill"))},
            "wall_s": wall, "timed_s": spent, "wall_over_timed": wall / spent,
            "top_op": f"{top['op']} {top['ms_nondet']:.2f} -> {top['ms_det']:.2f} ms"}


def main() -> None:
    rows = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        for w in WORKLOADS:
            for fill in (True, False):  # one workload's two probes back to back: the same machine state
                rows.append(timed(probe_spec(w, fill), f"{d}/{w['arch']}-{fill}"))
    table = pd.DataFrame(rows)
    print(f"probe on the CPU, 1 thread, {REPEATS} repeats per probe, total {time.perf_counter() - t0:.0f} s")
    print(reduce.format_markdown(table))
    covers = ((table.overhead_kernels_lo <= 0) & (table.overhead_kernels_hi >= 0)).all()
    print(f"same kernels: the kernels part's interval covers 0 in every probe: {bool(covers)}; "
          f"max |kernels part| {table.overhead_kernels_pct.abs().max():.1f}%")
    for arch, g in table.groupby("arch", sort=False):
        three, two = (g[g.modes == n].iloc[0] for n in (3, 2))
        print(f"{arch}: probe wall / timed steps {three.wall_over_timed:.2f} (three modes), "
              f"{two.wall_over_timed:.2f} (two); three-mode probe wall / two-mode {three.wall_s / two.wall_s:.2f}")


if __name__ == "__main__":
    main()
