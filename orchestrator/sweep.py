"""`python -m orchestrator.sweep [CONFIG] [--out URI] [--address ADDR] [--fresh]`

build (validate, expand, check OUT) -> run (Ray Tune, one trial per replica) -> record -> reduce.
Everything that can be wrong with the input is found before Ray starts (exit 2). Re-running the
same command resumes: run_ids already `ok` under OUT are not run again.
"""

from __future__ import annotations

import argparse
import atexit
import functools
import json
import logging
import os
import signal
import sys
import threading
import time
from collections import defaultdict, deque
from pathlib import Path

import yaml

from orchestrator import lease, stacks, store
from orchestrator.axes import CODE_ENV, Stack
from orchestrator.spec import ProbeSpec, RunSpec, SpecError, SweepSpec, expand, expand_probes, expanded, load

# Tune's per-trial JSON/CSV/TensorBoard loggers cost more than a small replica's training.
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
# Resume reads OUT, never Tune's experiment state, so its periodic snapshot is bookkeeping only.
os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "300")
# A dead worker is one line per run in main's report (full text in the row and OUT/logs), not
# Tune's traceback per failure; and Tune's own tables and boxes stay off the terminal (its newer
# output engine prints them even at verbose=0), which shows the sweep's progress lines instead.
os.environ.setdefault("TUNE_PRINT_ALL_TRIAL_ERRORS", "0")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
# Ctrl-C raises KeyboardInterrupt at once (main says how to resume) instead of Tune's own stop,
# which waits for a checkpoint and then suggests Tuner.restore(...): resuming here is re-running.
os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
STORAGE = "storage failed"  # a trial's status when its outcome could not be written under OUT
EXIT_STORAGE = 4  # the sweep's exit code when writes under OUT failed: 0 ok, 1 runs failed, 2 refused, 130 Ctrl-C
OUT_ENTRIES = ("sweep.yaml", "runs", "weights", "datasets", "overhead", "tables", "tune", "logs", "progress.json")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m orchestrator.sweep", description=__doc__.split("\n\n")[1])
    p.add_argument("config", nargs="?", help="sweep YAML; omitted: the embedded default sweep")
    p.add_argument("--out", help="results folder or s3://bucket/prefix (overrides the spec's out)")
    p.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else a local cluster)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override a sweep field before it is checked, by dotted path (repeatable): "
                        "--set replicas=2 --set workloads.0.epochs=1")
    p.add_argument("--fresh", action="store_true", help="delete OUT's previous results first, even another sweep's")
    p.add_argument("--wait-for-autoscaling", action="store_true",
                   help="skip the pre-flight check and let pending runs wait for nodes the autoscaler adds")
    return p.parse_args(argv)


def check_out(spec: SweepSpec, out: str, fresh: bool) -> list[str]:
    """Refuse an OUT that is a file or holds another sweep's results (unless --fresh). Reads only:
    returns the entries --fresh will delete once nothing else can refuse (see `start_out`)."""
    fs, root = store.resolve(out)
    if store.is_local(fs) and Path(root).is_file():
        raise SpecError(f"--out: {out} is a file; give a folder (or s3://bucket/prefix)")
    spec_path = f"{root}/sweep.yaml"
    if store.exists(fs, spec_path) and not fresh:
        old = yaml.safe_load(store.read_bytes(fs, spec_path)) or {}
        if (old.get("name"), old.get("base_seed")) != (spec.name, spec.base_seed):
            raise SpecError(f"--out: {out} holds results of sweep {old.get('name')!r} (base_seed "
                            f"{old.get('base_seed')}); choose another --out or pass --fresh to delete them")
    return [entry for entry in OUT_ENTRIES if fresh and store.exists(fs, f"{root}/{entry}")]


def start_out(spec: SweepSpec, out: str, doomed: list[str], progress: dict) -> None:
    """The first write under OUT, once spec, OUT, connection and pre-flight have all passed: delete
    what --fresh named (saying so, entry by entry), record the resolved spec and the starting counts."""
    fs, root = store.resolve(out)
    for entry in doomed:
        info = fs.get_file_info(f"{root}/{entry}")
        is_dir = info.type == store.pafs.FileType.Directory
        print(f"--fresh: deleting {out}/{entry}{'/' if is_dir else ''}", file=sys.stderr)
        fs.delete_dir(info.path) if is_dir else fs.delete_file(info.path)
    store.write_bytes(fs, f"{root}/sweep.yaml", yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False).encode())
    store.write_bytes(fs, f"{root}/progress.json", json.dumps(progress).encode())


def preflight(runs: list[RunSpec]) -> None:
    """A run no node can ever hold would stay PENDING forever; fail now and name what exists."""
    import ray

    from orchestrator.worker import process_resources

    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    offered = sorted({k.split(":", 1)[1] for n in nodes for k in n if k.startswith("accelerator_type:")})
    for run in {(r.accelerator, r.world_size): r for r in runs}.values():
        fits = processes_that_fit(nodes, process_resources(run))
        if not fits:
            raise SpecError(f"accelerators: no node offers {run.accelerator} with {run.cpus:g} CPU and "
                            f"{run.gpus:g} GPU (accelerator types here: {', '.join(offered) or 'none'}); "
                            f"fix accelerators/resources or pass --wait-for-autoscaling")
        if fits < run.world_size:
            raise SpecError(f"tooling.world_size: a replica of world size {run.world_size} needs {run.world_size} "
                            f"processes of {run.cpus:g} CPU and {run.gpus:g} GPU on {run.accelerator} nodes at once; "
                            f"this cluster holds {fits}; lower world_size or resources, or pass --wait-for-autoscaling")


def processes_that_fit(nodes: list[dict], need: dict[str, float]) -> int:
    """How many processes needing `need` the nodes (Ray resource dicts) hold at once."""
    return sum(min(int(n.get(k, 0) // v) for k, v in need.items()) if need else 1 for n in nodes)


@functools.lru_cache(maxsize=2)
def _specs(ref) -> dict[str, str]:
    """A pool's spec table (id -> RunSpec/ProbeSpec JSON), fetched once per worker process: a
    fetch per trial would cost each trial time in proportion to the sweep's size."""
    import ray

    return ray.get(ref)


def _trial(config: dict, table: tuple) -> None:
    """One Tune trial = one replica, or one overhead probe, run by a process of its stack
    (orchestrator/worker.py). The config carries only the id; the spec comes from the pool's table,
    placed once in Ray's object store (`table` holds its ref). The worker writes its own files under OUT."""
    from ray import tune

    from orchestrator import worker
    # imported, not used as a global: under `python -m orchestrator.sweep` this module is __main__,
    # and Ray pickles `_trial` by value, but a worker can only reach the cache through the package
    from orchestrator.sweep import _specs

    try:
        row = worker.execute(expanded(_specs(table[0])[config["run"]]), config["out"])
    except OSError as e:  # its result could not be written under OUT: the driver counts it, resume reruns it
        row = {"status": STORAGE, "error": f"{type(e).__name__}: {e}"}
    tune.report({"status": row["status"], "test_accuracy": row.get("test_accuracy"), "error": row.get("error")})


def make_progress(total: int, out: str, failure_row, fail_fast: FailFast, by_id: dict, done: int = 0):
    """A Tune callback that prints done/total, failed, elapsed and ETA and mirrors the counts to
    OUT/progress.json, records a trial that failed for good (Tune gave up retrying), and tells
    fail-fast how each run ended. One instance serves every pool of a sweep.
    `total` counts every run of the sweep and `done` starts at those already ok under OUT."""
    from ray.tune import Callback

    from orchestrator.runner import base_row

    fs, root = store.resolve(out)

    class Progress(Callback):
        def __init__(self):
            self.t0, self.done, self.failed, self.skipped, self.written = time.time(), done, 0, 0, 0.0
            self.lost: list[str] = []  # storage faults: runs whose outcome could not be written
            self.ahead: list[Stack] = []  # stacks of the pools not yet finished, set by schedule

        def builds(self) -> str:
            """The environment builds still ahead, which the run rate cannot foresee (a first build of a
            torch stack takes minutes where a run took seconds). A build on another node is not seen
            from here: counted until its pool ends."""
            k = len({stacks.key(s) for s in self.ahead if (s.pip or s.uv) and not stacks.built(s)})
            return f" + {k} environment build{'s' * (k > 1)}" if k else ""

        def storage_fault(self, error: BaseException | str) -> None:
            """A write under OUT that failed (after store.WRITE_TRIES tries) is counted and said once,
            never raised into Tune, where it ended the whole sweep: the run is left for resume."""
            self.lost.append((str(error).strip().splitlines() or [type(error).__name__])[0][:300])
            if len(self.lost) == 1:
                print(f"storage: a write under {out} failed ({self.lost[0]}); the sweep goes on and the runs "
                      "whose results could not be written are left for the same command to resume", file=sys.stderr,
                      flush=True)

        def stored(self, write, *args, **kwargs) -> None:
            try:
                write(*args, **kwargs)
            except OSError as e:
                self.storage_fault(e)

        def _update(self, failed: bool, skipped: bool = False) -> None:
            self.done, self.failed, self.skipped = self.done + 1, self.failed + failed, self.skipped + skipped
            elapsed = time.time() - self.t0
            eta = elapsed / (self.done - done) * (total - self.done)
            print(f"[{self.done}/{total}] failed {self.failed}" + (f"  skipped {self.skipped}" if self.skipped else "")
                  + f"  elapsed {elapsed:.0f}s  eta {eta:.0f}s{self.builds()}", flush=True)
            if time.time() - self.written < 1 and self.done < total:
                return  # at most one write a second: a PUT per run would slow the driver's loop
            self.written = time.time()
            state = {"done": self.done, "total": total, "failed": self.failed, "skipped": self.skipped,
                     "elapsed_s": round(elapsed, 1), "eta_s": round(eta, 1), "updated": self.written}
            # tried once: it is rewritten at the next completion, and this callback runs in Tune's loop, which
            # a retry's backoff stopped for every trial (3.5 s a completion while object storage was down)
            self.stored(store.write_bytes, fs, f"{root}/progress.json", json.dumps(state).encode(), tries=1)

        def skip(self, run: RunSpec, error: str) -> None:
            self.stored(store.write_run, fs, root, base_row(run) | {"status": "skipped", "error": error})
            self._update(False, skipped=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            result = trial.last_result or {}
            if result.get("status") == STORAGE:
                self.storage_fault(result.get("error"))
            elif isinstance(run := by_id[trial.config["run"]], RunSpec):
                if trial.num_failures:  # Tune restarted a trial whose process died: its row says so
                    self.stored(store.amend_run, fs, root, run.run_id, attempts=trial.num_failures + 1)
                fail_fast.record(run, None if result.get("status") == "ok" else str(result.get("error")))
            self._update(result.get("status") != "ok")

        def on_trial_error(self, iteration, trials, trial, **info):
            run = by_id[trial.config["run"]]
            try:
                error = failure_row(run, trial_error(trial), trial.num_failures)
            except OSError as e:
                self.storage_fault(e)
                error = "storage failed"
            if isinstance(run, RunSpec):
                fail_fast.record(run, error.splitlines()[0])
            self._update(True)

    return Progress()


def trial_error(trial) -> str:
    """What Tune recorded of a trial's failures: its local error file (the copy under Tune's
    storage is synced later, so `trial.get_error()` is still empty when the trial fails)."""
    path = trial.error_file
    return Path(path).read_text() if path and Path(path).exists() else str(trial.get_error() or "")


def record_trial_error(out: str):
    """A trial that raised or whose worker died (after its retries): the whole error goes to
    OUT/logs/<id>.log, and a run also gets a failed row whose error opens with one line (the last
    of Ray's text) followed by the whole text; returns that. A probe has no row: main reports it missing."""
    fs, root = store.resolve(out)

    def write(run: RunSpec | ProbeSpec, error: str, attempts: int) -> str:
        from orchestrator.runner import base_row

        last = error.strip().splitlines()[-1] if error.strip() else "no error text"
        # a run's own errors are caught by the runner, so a run's trial error is a dead worker
        full = f"{'worker died: ' if isinstance(run, RunSpec) else ''}{last}\n\n{error.strip()}\n"
        # the log is tried once: this runs in Tune's loop, which each retry's backoff held up for every
        # trial while OUT's storage was down; a run's row (which keeps its tries) holds the same text,
        # and a probe's error is printed and the probe, having no result, runs again on resume
        store.write_bytes(fs, store.log_path(root, _trial_id(run)), full.encode(), tries=1)
        if isinstance(run, RunSpec):
            store.write_run(fs, root, base_row(run) | {"status": "failed", "error": full.strip(), "attempts": attempts})
        return full

    return write


class FailFast:
    """Stops a workload whose first k finished runs all failed with the same error (a missing
    dataset, an import error): the rest would only fail the same way, for hours on a GPU cluster.
    Until those k are in, at most k runs of the workload start. Probes (key None) never stop."""

    def __init__(self, k: int):
        self.k, self.first = k, defaultdict(list)  # workload key -> errors of its first k runs (None = ok)

    @staticmethod
    def key(run: RunSpec | ProbeSpec) -> str | None:
        """Per workload and stack: a stack that cannot be built stops its own runs, not the others'."""
        return run.workload.model_dump_json() + run.stack.name if isinstance(run, RunSpec) else None

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

    from orchestrator.worker import bundles

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
                    return {"run": _trial_id(run), "bundles": bundles(run)}
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
    unpickles it twice per trial, so it holds nothing that grows with the sweep: the placement group
    comes from the trial's config (`worker.bundles`), specs from the table. PACK: one node where the
    bundles fit, the ranks of a data-parallel replica spread over nodes where they do not."""
    from ray import tune

    def resources(config):
        return tune.PlacementGroupFactory(config["bundles"], strategy="PACK")

    return tune.with_resources(tune.with_parameters(_trial, table=(table,)), resources=resources)


def pools(runs: list[RunSpec | ProbeSpec]) -> list[list[RunSpec | ProbeSpec]]:
    """One Tune run per (stack, determinism mode, world size), probes apart, so that a reused worker
    process never changes environment or mode: a stack's variables and packages are fixed when its
    process starts, and cuBLAS reads CUBLAS_WORKSPACE_CONFIG once, when CUDA starts."""
    by_key = defaultdict(list)
    for r in runs:
        mode = "probes" if isinstance(r, ProbeSpec) else "nondeterministic" if "impl" in r.vary else "deterministic"
        by_key[r.stack.name, mode, r.world_size].append(r)
    return list(by_key.values())


def quiet_tune() -> None:
    """Tune log lines that repeat what main reports itself, one line per failed run."""
    # the result grid would warn once per trial that the disabled loggers wrote no metrics
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    tune_log = logging.getLogger("ray.tune.tune")
    if not tune_log.filters:
        tune_log.addFilter(lambda record: not record.getMessage().startswith("Trials did not complete"))


def schedule(runs: list[RunSpec | ProbeSpec], spec: SweepSpec, out: str, total: int) -> list[str]:
    """Fan the runs out as Tune trials, one per replica or overhead probe, one Tune run per pool.
    Worker processes are reused within a pool (warm: torch imported, dataset cached, CUDA up).
    Returns the storage faults met (writes under OUT that failed): those runs are left for resume."""
    import ray
    from ray import tune

    # A custom searcher gets 1 pending trial by default, which leaves slots idle between short
    # trials; allow one per CPU (at least 16, so the autoscaler sees demand).
    os.environ.setdefault("TUNE_MAX_PENDING_TRIALS_PG", str(max(16, int(ray.cluster_resources().get("CPU", 1)))))
    by_id = {_trial_id(r): r for r in runs}
    fs, root = store.resolve(out)
    quiet_tune()
    fail_fast = FailFast(spec.fail_fast)
    progress = make_progress(total, out, record_trial_error(out), fail_fast, by_id, total - len(runs))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    todo = pools(runs)
    for n, pool in enumerate(todo):
        progress.ahead = [p[0].stack for p in todo[n:]]
        if installer := {k: v for k, v in pool[0].stack.runtime_env().items() if k != "env_vars"}:
            print(f"stack {pool[0].stack.name}: {len(pool)} trials; its environment ({installer}) is built on "
                  "each node before the node's first run in it, unless an earlier sweep built it there", flush=True)
        tuner = tune.Tuner(
            trainable(ray.put({_trial_id(r): r.model_dump_json() for r in pool})),
            param_space={"out": out},
            tune_config=tune.TuneConfig(search_alg=run_queue(pool, fail_fast, progress), num_samples=len(pool),
                                        max_concurrent_trials=replicas_at_once(pool[0]),
                                        reuse_actors=True, trial_dirname_creator=lambda t: t.config["run"]),
            run_config=tune.RunConfig(
                name=f"{spec.name}-{stamp}-{n}",
                # beside the results (shared storage on a multi-node cluster), through the store's file
                # system: its bounded waits, where Tune's own S3 client retried an outage for minutes
                storage_path=f"{root}/tune", storage_filesystem=fs,
                failure_config=tune.FailureConfig(max_failures=spec.max_retries),
                callbacks=[progress], verbose=0))
        try:
            tuner.fit()  # trial outcomes are in OUT/runs; Tune's own result grid is not needed
        except OSError as e:  # Tune's own state under OUT/tune could not be written or read back
            progress.storage_fault(e)
    return progress.lost


def replicas_at_once(run: RunSpec | ProbeSpec) -> int | None:
    """For data-parallel replicas: how many the cluster holds at once. Their coordinating trials
    hold no CPU, so Tune alone would start every one of them, each Train run then waiting for its
    workers. None (no limit: resources bound the trials) at world size 1."""
    import ray

    from orchestrator.worker import process_resources

    if run.world_size == 1:
        return None
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    return max(1, processes_that_fit(nodes, process_resources(run)) // run.world_size)


class ConnectError(SpecError):
    """The cluster cannot be joined: one line saying what to set."""


def connect(address: str | None) -> None:
    """Join the cluster given by --address or RAY_ADDRESS (as inside `ray job submit`), or start
    a local one on this machine's cores, stopped when the sweep ends."""
    import ray

    if ray.is_initialized():  # already connected (tests, notebooks): use that cluster
        return
    address = address or os.environ.get("RAY_ADDRESS")
    print(f"joining the Ray cluster at {address} ..." if address else
          f"starting a local Ray cluster on {os.cpu_count()} CPU cores (takes a few seconds) ...", flush=True)
    # A local cluster turns token authentication on and says so in a warning, every run
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    try:
        # "local": a cluster of its own, never one `ray start` registered on this host by discovery
        ray.init(address=address or "local", include_dashboard=False, logging_level="WARNING")
    except Exception as e:  # noqa: BLE001 - Ray raises RuntimeError, ConnectionError, AuthenticationError...
        raise connect_error(address, e) from None
    if not address:
        atexit.register(ray.shutdown)  # its children and their groups stop with it; stack builds stay


def connect_error(address: str | None, error: Exception) -> ConnectError:
    """Ray's connection failures (tracebacks of gRPC retries) as one line saying what to set."""
    text = f"{type(error).__name__}: {error}"
    if any(k in text for k in ("InvalidAuthToken", "UNAUTHENTICATED", "Unauthenticated", "AuthenticationError")):
        return ConnectError(f"--address: the Ray cluster at {address} requires a token; export RAY_AUTH_MODE=token "
                            "and RAY_AUTH_TOKEN=<the cluster's token> (or put it in ~/.ray/auth_token), see "
                            "cluster/README.md step 3")
    first = text.strip().splitlines()[0]
    return ConnectError(f"--address: cannot join the Ray cluster at {address or 'this machine'} ({first}); "
                        "check --address / RAY_ADDRESS and that the cluster is up")


SUMMARY = ["n_runs", "n_failed", "acc_mean", "acc_std", "acc_std_lo", "acc_std_hi", "churn", "l2",
           "identical_fraction"]


def summary(variance):
    """The variance table cut to what fits a terminal: every grouping column that differs between
    rows (always noise), then the headline statistics. The full table is in OUT/tables."""
    from orchestrator.reduce import DEFAULT_BY

    keys = [c for c in DEFAULT_BY if c in variance and (c == "noise" or variance[c].nunique(dropna=False) > 1)]
    return variance[keys + [c for c in SUMMARY if c in variance]]


def no_effect(variance) -> list[str]:
    """The groups whose varied sources left the weights bit for bit the same (reduce.no_effect_note),
    a line each under the summary: a source the training never drew from is a bug in the user's code
    more often than a finding, and a zero in a table is easy to read past."""
    keys = [c for c in summary(variance).columns if c not in SUMMARY]
    return [" ".join(str(row[k]) for k in keys) + ": " + note
            for _, row in variance.iterrows()
            for note in (row["note"] or "").split("; ") if note.startswith("no effect")]


def first_line(error: str | None) -> str:
    first = ((error or "").strip().splitlines() or ["no error recorded"])[0]
    return f"{first[:200]}{'…' if len(first) > 200 else ''}"


INTERRUPTED = threading.Event()


def _interrupt(signum, frame) -> None:
    """Ctrl-C: remembered, then Python's own KeyboardInterrupt. Remembered because an interrupt
    raised inside Ray or Tune code can be swallowed there; the sweep still ends as interrupted."""
    INTERRUPTED.set()
    signal.default_int_handler(signum, frame)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    INTERRUPTED.clear()
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, _interrupt) if main_thread else None
    try:
        return run_sweep(args)
    except (SpecError, store.StoreError) as e:  # nothing started, nothing under OUT changed
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; runs already ok under OUT are kept and the same command resumes", file=sys.stderr)
        return 130
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, previous)


def resource_notes(spec: SweepSpec) -> list[str]:
    """What a valid spec costs that a user may not expect, said once at start."""
    threads = max(spec.tooling.num_threads)
    if threads > spec.resources.cpus:
        return [f"tooling.num_threads {threads} > resources.cpus {spec.resources.cpus:g}: those runs ask Ray for "
                f"{threads} CPUs each, so fewer run at once; and an intra-op thread that waits for a core busy with "
                "another process slows every step (tiny models run slower on 2 threads than on 1): give "
                f"resources.cpus: {threads} to say so, or compare thread counts on an otherwise idle node"]
    return []


def code_env_notes(spec: SweepSpec) -> list[str]:
    """Environment variables of the sweep file's stacks that load code into every worker
    (axes.CODE_ENV): said once, since a sweep file runs code with the user's rights. Each row's
    `env` records them, and those the launch environment passed on."""
    return [f"stack {s.name!r} sets {', '.join(names)}: what it names is loaded into every worker of the stack "
            "(recorded in each row's env)" for s in spec.stacks if (names := [k for k in CODE_ENV if k in s.env_vars])]


def run_sweep(args: argparse.Namespace) -> int:
    """build -> (check OUT, connect, pre-flight: all may refuse) -> first write -> run -> reduce."""
    spec = load(args.config, args.overrides)
    out = store.absolute(args.out or spec.out_uri)
    runs, probes = expand(spec), expand_probes(spec)
    try:
        doomed = check_out(spec, out, args.fresh)
        ok, done_probes = (set(), set()) if args.fresh else (store.ok_run_ids(out), store.done_probe_ids(out))
    except OSError as e:
        raise store.unreachable(out, e) from None
    todo = [r for r in runs if r.run_id not in ok]
    todo_probes = [p for p in probes if p.probe_id not in done_probes]
    total, already = len(runs) + len(probes), len(runs) - len(todo) + len(probes) - len(todo_probes)
    print(f"sweep {spec.name}: {len(runs)} runs, {len(runs) - len(todo)} already ok in {out}, {len(todo)} to run"
          + (f"; {len(probes)} overhead probes, {len(todo_probes)} to run" if probes else ""), flush=True)
    for note in resource_notes(spec) + code_env_notes(spec):
        print(f"note: {note}", flush=True)
    with lease.held(out):  # before anything under OUT is written or deleted; also proves OUT writable
        return run_leased(args, spec, out, runs, probes, todo, todo_probes, doomed, total, already)


def run_leased(args, spec, out, runs, probes, todo, todo_probes, doomed, total, already) -> int:
    """The part of a sweep that may write under OUT, under its lease."""
    if todo or todo_probes:
        connect(args.address)
        if not args.wait_for_autoscaling:
            preflight(todo + todo_probes)
    start_out(spec, out, doomed, {"done": already, "total": total, "failed": 0, "updated": time.time()})
    lost = []
    if todo or todo_probes:
        print(f"running {len(todo) + len(todo_probes)} trials with Ray Tune; progress also in {out}/progress.json",
              flush=True)
        try:
            lost = schedule(todo + todo_probes, spec, out, total)
        except KeyboardInterrupt:
            return interrupted(out, runs)
        if INTERRUPTED.is_set():
            return interrupted(out, runs)
    try:
        store.compact(out, at_least=store.COMPACT_AT)
        code = report(out, runs, probes)
    except OSError as e:
        lost.append(str(store.unreachable(out, e)))
    if lost:
        print(f"error: storage failed: {len(lost)} write(s) under {out} failed, first: {lost[0]}; the runs they "
              "concern are not ok there, and the same command resumes them once OUT is writable", file=sys.stderr)
        return EXIT_STORAGE
    return code


def report(out: str, runs: list[RunSpec], probes: list[ProbeSpec]) -> int:
    """Reduce OUT, print the short tables, then one line per failed run; exit 1 if any failed."""
    from orchestrator.reduce import format_markdown, reduce

    tables = reduce(out)
    if runs:
        print(format_markdown(summary(tables["variance"])))
        for line in no_effect(tables["variance"]):
            print(f"note: {line}")
    if probes:
        print(format_markdown(tables["overhead"]))
    fs, root = store.resolve(out)

    def full_error(trial_id: str) -> str:
        return f"  (full error: {out}/logs/{trial_id}.log)" if store.exists(fs, store.log_path(root, trial_id)) else ""

    missing = [p.probe_id for p in probes if p.probe_id not in store.done_probe_ids(out)]
    for probe_id in missing:
        where = full_error(probe_id) or " (its error is in the log above)"  # a probe's own error: printed by it
        print(f"failed: {probe_id}: the overhead probe wrote no result{where}", file=sys.stderr)
    failed = store.read_runs(out, columns=["run_id", "arch", "dataset", "status", "error"]).to_pandas()
    failed = failed[failed.run_id.isin({r.run_id for r in runs}) & (failed.status != "ok")]
    failed["first"] = [first_line(e) for e in failed.error]
    for (arch, dataset, first), g in failed[failed.status == "skipped"].groupby(["arch", "dataset", "first"]):
        print(f"skipped: {len(g)} runs of {arch} on {dataset} (fail_fast: the first runs of this workload all "
              f"failed with the same error): {first}", file=sys.stderr)
    # identical errors once, with their count: 24 runs of one bug are one line to read, not 24
    for first, g in failed[failed.status != "skipped"].groupby("first", sort=False):
        many = f"{len(g)} runs, e.g. " if len(g) > 1 else ""
        print(f"failed: {many}{g.run_id.iloc[0]}: {first}{full_error(g.run_id.iloc[0])}", file=sys.stderr)
    print(f"results: {out}  (tables in {out}/tables)")
    return 1 if len(failed) or missing else 0


def interrupted(out: str, runs: list[RunSpec]) -> int:
    """Ctrl-C mid-sweep: finished runs are safe under OUT (each file written whole); say how many,
    and that the same command resumes. 130 = 128 + SIGINT, the shell's convention."""
    ok = len({r.run_id for r in runs} & store.ok_run_ids(out))
    print(f"interrupted: {ok} of {len(runs)} runs are ok in {out}; run the same command again to resume "
          "(runs already ok are not run again)", file=sys.stderr)
    return 130


if __name__ == "__main__":
    sys.exit(main())
