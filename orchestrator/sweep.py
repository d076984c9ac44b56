"""`python -m orchestrator.sweep [CONFIG] [--out URI] [--address ADDR] [--fresh]`

build (validate, expand, check OUT) -> run (Ray Tune, one trial per replica) -> record -> reduce.
Everything that can be wrong with the input is found before Ray starts (exit 2). Re-running the
same command resumes: run_ids already `ok` under OUT are not run again.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
import time
from collections import defaultdict, deque
from pathlib import Path

import yaml

from orchestrator import store
from orchestrator.spec import ProbeSpec, RunSpec, SpecError, SweepSpec, expand, expand_probes, load

# Tune's per-trial JSON/CSV/TensorBoard loggers cost more than a small replica's training.
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
# Resume reads OUT, never Tune's experiment state, so its periodic snapshot is bookkeeping only.
os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "300")
OUT_ENTRIES = ("sweep.yaml", "runs", "weights", "datasets", "overhead", "tables", "tune", "progress.json")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m orchestrator.sweep", description=__doc__.split("\n\n")[1])
    p.add_argument("config", nargs="?", help="sweep YAML; omitted: the embedded default sweep")
    p.add_argument("--out", help="results folder or s3://bucket/prefix (overrides the spec's out)")
    p.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else a local cluster)")
    p.add_argument("--fresh", action="store_true", help="delete OUT's previous results first, even another sweep's")
    p.add_argument("--wait-for-autoscaling", action="store_true",
                   help="skip the pre-flight check and let pending runs wait for nodes the autoscaler adds")
    return p.parse_args(argv)


def prepare_out(spec: SweepSpec, out: str, fresh: bool) -> None:
    """Refuse an OUT that is a file or holds another sweep's results; with --fresh, say what is
    deleted. Then record the resolved spec as it runs."""
    fs, root = store.resolve(out)
    if store.is_local(fs) and Path(root).is_file():
        raise SpecError(f"--out: {out} is a file; give a folder (or s3://bucket/prefix)")
    spec_path = f"{root}/sweep.yaml"
    if store.exists(fs, spec_path) and not fresh:
        old = yaml.safe_load(store.read_bytes(fs, spec_path)) or {}
        if (old.get("name"), old.get("base_seed")) != (spec.name, spec.base_seed):
            raise SpecError(f"--out: {out} holds results of sweep {old.get('name')!r} (base_seed "
                            f"{old.get('base_seed')}); choose another --out or pass --fresh to delete them")
    if fresh:
        for entry in OUT_ENTRIES:
            info = fs.get_file_info(f"{root}/{entry}")
            if info.type == store.pafs.FileType.Directory:
                print(f"--fresh: deleting {root}/{entry}/", file=sys.stderr)
                fs.delete_dir(info.path)
            elif info.is_file:
                fs.delete_file(info.path)
    store.write_bytes(fs, spec_path, yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False).encode())


def resources(run: RunSpec) -> dict[str, float]:
    """Ray resources of one run. A named accelerator adds a sliver of the `accelerator_type:X`
    resource that only nodes with that GPU advertise, which is how the run is pinned to them."""
    req = {"cpu": run.cpus, "gpu": run.gpus}
    if run.accelerator != "any":
        req[f"accelerator_type:{run.accelerator}"] = 0.001
    return req


def preflight(runs: list[RunSpec]) -> None:
    """A run no node can ever hold would stay PENDING forever; fail now and name what exists."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    offered = sorted({k.split(":", 1)[1] for n in nodes for k in n if k.startswith("accelerator_type:")})
    for run in {r.accelerator: r for r in runs}.values():
        need = {"CPU": run.cpus, "GPU": run.gpus} | {k: v for k, v in resources(run).items() if ":" in k}
        if not any(all(n.get(k, 0) >= v for k, v in need.items() if v) for n in nodes):
            raise SpecError(f"accelerators: no node offers {run.accelerator} with {run.cpus:g} CPU and "
                            f"{run.gpus:g} GPU (accelerator types here: {', '.join(offered) or 'none'}); "
                            f"fix accelerators/resources or pass --wait-for-autoscaling")


@functools.lru_cache(maxsize=2)
def _specs(ref) -> dict[str, str]:
    """A pool's spec table (id -> RunSpec/ProbeSpec JSON), fetched once per worker process: a
    fetch per trial would cost each trial time in proportion to the sweep's size."""
    import ray

    return ray.get(ref)


def _trial(config: dict, table: tuple) -> None:
    """One Tune trial = one replica, or one overhead probe. The config carries only the id; the
    spec comes from the pool's table, placed once in Ray's object store (`table` holds its ref).
    The worker writes its own files under OUT."""
    from ray import tune

    from orchestrator import probe, runner
    # imported, not used as a global: under `python -m orchestrator.sweep` this module is __main__,
    # and Ray pickles `_trial` by value, but a worker can only reach the cache through the package
    from orchestrator.sweep import _specs

    item = json.loads(_specs(table[0])[config["run"]])
    if "probe_id" in item:
        row = probe.run(ProbeSpec.model_validate(item), config["out"])
    else:
        row = runner.run(RunSpec.model_validate(item), config["out"])
    tune.report({"status": row["status"], "test_accuracy": row.get("test_accuracy"), "error": row.get("error")})


def make_progress(total: int, out: str, fail_fast: FailFast, by_id: dict):
    """A Tune callback that prints done/total, failed, elapsed and ETA and mirrors the counts to
    OUT/progress.json, records a run whose worker died for good (Tune gave up retrying), and tells
    fail-fast how each run ended. One instance serves every pool of a sweep."""
    from ray.tune import Callback

    record = row_writer(out)
    fs, root = store.resolve(out)

    class Progress(Callback):
        def __init__(self):
            self.t0, self.done, self.failed, self.skipped, self.written = time.time(), 0, 0, 0, 0.0

        def _update(self, failed: bool, skipped: bool = False) -> None:
            self.done, self.failed, self.skipped = self.done + 1, self.failed + failed, self.skipped + skipped
            elapsed = time.time() - self.t0
            eta = elapsed / self.done * (total - self.done)
            print(f"[{self.done}/{total}] failed {self.failed}" + (f"  skipped {self.skipped}" if self.skipped else "")
                  + f"  elapsed {elapsed:.0f}s  eta {eta:.0f}s", flush=True)
            if time.time() - self.written < 1 and self.done < total:
                return  # at most one write a second: a PUT per run would slow the driver's loop
            self.written = time.time()
            state = {"done": self.done, "total": total, "failed": self.failed, "skipped": self.skipped,
                     "elapsed_s": round(elapsed, 1), "eta_s": round(eta, 1), "updated": self.written}
            store.write_bytes(fs, f"{root}/progress.json", json.dumps(state).encode())

        def skip(self, run: RunSpec, error: str) -> None:
            record(run, "skipped", error)
            self._update(False, skipped=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            result = trial.last_result or {}
            if isinstance(spec := by_id[trial.config["run"]], RunSpec):
                fail_fast.record(spec, None if result.get("status") == "ok" else str(result.get("error")))
            self._update(result.get("status") != "ok")

        def on_trial_error(self, iteration, trials, trial, **info):
            if isinstance(spec := by_id[trial.config["run"]], RunSpec):  # a dead probe leaves no file: main reports it
                error = str(trial.get_error() or "").strip()
                error = f"worker died: {error.splitlines()[-1] if error else 'worker died'}"
                record(spec, "failed", error)
                fail_fast.record(spec, error)
            self._update(True)

    return Progress()


def row_writer(out: str):
    """Writes the row of a run that has no row of its own: its worker died, or fail-fast skipped it."""
    fs, root = store.resolve(out)

    def write(run: RunSpec, status: str, error: str) -> None:
        from orchestrator.runner import base_row

        store.write_run(fs, root, base_row(run) | {"status": status, "error": error})

    return write


class FailFast:
    """Stops a workload whose first k finished runs all failed with the same error (a missing
    dataset, an import error): the rest would only fail the same way, for hours on a GPU cluster.
    Until those k are in, at most k runs of the workload start. Probes (key None) never stop."""

    def __init__(self, k: int):
        self.k, self.first = k, defaultdict(list)  # workload key -> errors of its first k runs (None = ok)

    @staticmethod
    def key(run: RunSpec | ProbeSpec) -> str | None:
        return run.workload.model_dump_json() if isinstance(run, RunSpec) else None

    def record(self, run: RunSpec, error: str | None) -> None:
        first = self.first[self.key(run)]
        if len(first) < self.k:
            first.append(error)

    def stopped(self, key: str | None) -> str | None:
        """The error that stopped this workload, or None."""
        first = self.first.get(key, [])
        same = self.k and len(first) == self.k and first[0] is not None and first.count(first[0]) == self.k
        return first[0] if same else None

    def waiting(self, key: str | None) -> bool:
        """The workload's first k runs are not all in yet, and all that are failed alike."""
        first = self.first.get(key, [])
        return key is not None and bool(self.k) and len(first) < self.k and None not in first and len(set(first)) <= 1


def run_queue(pool: list[RunSpec | ProbeSpec], fail_fast: FailFast, progress):
    """A Tune searcher that hands the pool's runs out one at a time, in order: linear in the number
    of runs (Tune's variant generation over a grid_search of N runs is quadratic). A run of a
    workload that fail-fast stopped is recorded skipped instead of started."""
    from ray.tune.search import Searcher

    class RunQueue(Searcher):
        def __init__(self):
            super().__init__()
            self.queues, self.started = defaultdict(deque), defaultdict(int)
            for run in pool:
                self.queues[fail_fast.key(run)].append(run)

        def suggest(self, trial_id: str):
            for key, queue in self.queues.items():
                while queue and (error := fail_fast.stopped(key)):
                    progress.skip(queue.popleft(), error)
                if queue and not (fail_fast.waiting(key) and self.started[key] >= fail_fast.k):
                    self.started[key] += 1
                    run = queue.popleft()
                    return {"run": _trial_id(run), "resources": resources(run)}
            # None: runs are held until their workload's first results are in; Tune asks again
            return None if any(self.queues.values()) else Searcher.FINISHED

        def on_trial_complete(self, trial_id: str, result=None, error: bool = False) -> None:
            pass  # outcomes reach fail-fast through the Progress callback, which also sees worker deaths

        def save(self, checkpoint_path: str) -> None:
            pass  # nothing to save: a resumed sweep rebuilds the queue from what OUT lacks

    return RunQueue()


def _trial_id(run: RunSpec | ProbeSpec) -> str:
    return run.run_id if isinstance(run, RunSpec) else run.probe_id


def trainable(table):
    """The Tune trainable of one pool, given the ref of its spec table in the object store. Tune
    unpickles it twice per trial, so it holds nothing that grows with the sweep: resources come from
    the trial's config, specs from the table."""
    from ray import tune

    return tune.with_resources(tune.with_parameters(_trial, table=(table,)),
                               resources=lambda config: config["resources"])


def pools(runs: list[RunSpec | ProbeSpec]) -> list[list[RunSpec | ProbeSpec]]:
    """Deterministic runs, non-deterministic runs and probes each get their own Tune run, so a
    reused worker process never changes mode: cuBLAS reads CUBLAS_WORKSPACE_CONFIG once, when CUDA
    starts, so a warm GPU worker keeps the mode of its first run."""
    by_mode = {"deterministic": [], "nondeterministic": [], "probes": []}
    for r in runs:
        by_mode["probes" if isinstance(r, ProbeSpec) else "nondeterministic" if "impl" in r.vary
                else "deterministic"].append(r)
    return [pool for pool in by_mode.values() if pool]


def schedule(runs: list[RunSpec | ProbeSpec], spec: SweepSpec, out: str) -> None:
    """Fan the runs out as Tune trials, one per replica or overhead probe, one Tune run per pool.
    Worker processes are reused within a pool (warm: torch imported, dataset cached, CUDA up)."""
    import ray
    from ray import tune

    # A custom searcher gets 1 pending trial by default, which leaves slots idle between short
    # trials; allow one per CPU (at least 16, so the autoscaler sees demand).
    os.environ.setdefault("TUNE_MAX_PENDING_TRIALS_PG", str(max(16, int(ray.cluster_resources().get("CPU", 1)))))
    by_id = {_trial_id(r): r for r in runs}
    # Tune's result grid would warn once per trial that the disabled loggers wrote no metrics.
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    fail_fast = FailFast(spec.fail_fast)
    progress = make_progress(len(runs), out, fail_fast, by_id)
    stamp = time.strftime('%Y%m%d-%H%M%S')
    for n, pool in enumerate(pools(runs)):
        tuner = tune.Tuner(
            trainable(ray.put({_trial_id(r): r.model_dump_json() for r in pool})),
            param_space={"out": out},
            tune_config=tune.TuneConfig(search_alg=run_queue(pool, fail_fast, progress), num_samples=len(pool),
                                        reuse_actors=True, trial_dirname_creator=lambda t: t.config["run"]),
            run_config=tune.RunConfig(
                name=f"{spec.name}-{stamp}-{n}",
                storage_path=f"{out}/tune",  # beside the results: shared storage on a multi-node cluster
                failure_config=tune.FailureConfig(max_failures=spec.max_retries),
                callbacks=[progress], verbose=0))
        tuner.fit()  # trial outcomes are in OUT/runs; Tune's own result grid is not needed


def connect(address: str | None) -> None:
    """Join the cluster given by --address or RAY_ADDRESS (as inside `ray job submit`), or start
    a local one on this machine's cores."""
    import ray

    if ray.is_initialized():  # already connected (tests, notebooks): use that cluster
        return
    ray.init(address=address or os.environ.get("RAY_ADDRESS"), include_dashboard=False,
             logging_level="WARNING")


SUMMARY = ["n_runs", "n_failed", "acc_mean", "acc_std", "acc_std_lo", "acc_std_hi", "churn", "l2",
           "identical_fraction"]


def summary(variance):
    """The variance table cut to what fits a terminal: the grouping columns that differ between
    rows (always noise), then the headline statistics. The full table is in OUT/tables."""
    keys = [c for c in ("arch", "dataset", "accelerator_requested", "num_threads", "precision", "noise")
            if c in variance and (c == "noise" or variance[c].nunique() > 1)]
    return variance[keys + [c for c in SUMMARY if c in variance]]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        spec = load(args.config)
        out = store.absolute(args.out or spec.out_uri)
        runs = expand(spec)
        probes = expand_probes(spec)
        prepare_out(spec, out, args.fresh)
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    todo = [r for r in runs if r.run_id not in store.ok_run_ids(out)]
    todo_probes = [p for p in probes if p.probe_id not in store.done_probe_ids(out)]
    print(f"sweep {spec.name}: {len(runs)} runs, {len(runs) - len(todo)} already ok in {out}, {len(todo)} to run"
          + (f"; {len(probes)} overhead probes, {len(todo_probes)} to run" if probes else ""))
    if todo or todo_probes:
        connect(args.address)
        try:
            if not args.wait_for_autoscaling:
                preflight(todo + todo_probes)
        except SpecError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        schedule(todo + todo_probes, spec, out)
    store.compact(out, at_least=store.COMPACT_AT)
    from orchestrator.reduce import format_markdown, reduce

    tables = reduce(out)
    print(format_markdown(summary(tables["variance"])))
    if probes:
        print(format_markdown(tables["overhead"]))
    missing = [p.probe_id for p in probes if p.probe_id not in store.done_probe_ids(out)]
    for probe_id in missing:
        print(f"failed: {probe_id}: the overhead probe wrote no result (its error is in the log above)",
              file=sys.stderr)
    failed = store.read_runs(out, columns=["run_id", "arch", "dataset", "status", "error"]).to_pandas()
    failed = failed[failed.run_id.isin({r.run_id for r in runs}) & (failed.status != "ok")]
    for r in failed[failed.status != "skipped"].itertuples():
        print(f"failed: {r.run_id}: {r.error}", file=sys.stderr)
    for (arch, dataset, error), g in failed[failed.status == "skipped"].groupby(["arch", "dataset", "error"]):
        print(f"skipped: {len(g)} runs of {arch} on {dataset} (fail_fast: its first {spec.fail_fast} runs failed "
              f"with the same error): {error}", file=sys.stderr)
    print(f"results: {out}  (tables in {out}/tables)")
    return 1 if len(failed) or missing else 0


if __name__ == "__main__":
    sys.exit(main())
