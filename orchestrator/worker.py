"""Where a Tune trial's replica or probe executes: in a warm process of the run's software stack,
or, for a data-parallel replica (world size k > 1), in a Ray Train run of k processes.

    launch stack, world size 1:   Tune trial, holding the run's resources, trains in its own process
    other stack, world size 1:    Tune trial (coordinator: memory only) --> Replica actor: the stack's
                                  runtime_env, the run's resources (CPUs, GPU, accelerator)
    world size k > 1:             Tune trial (coordinator: memory only) --> TorchTrainer: k workers with
                                  the run's resources each, worker_runtime_env = the stack's

A run in the launch environment (the default stack) at world size 1 runs in the trial's own
process, as a plain Tune trial. For any other stack: Tune has no per-trial runtime_env
(ray-project/ray#23234), so the trial starts a child actor with the stack's runtime_env in the
second bundle of the trial's own placement group, whose first bundle (the coordinator's) holds no
CPU and no GPU. Ray sets the stack's environment variables and
packages when that process starts, before torch is imported and CUDA starts. Tune reuses a trial's
actor, and with it its placement group, for the next trial of the same pool (one stack, one
determinism mode, one world size: `sweep.pools`), so the child is created once per coordinator and stays warm:
torch imported, dataset cached, CUDA up.

A stack whose environment cannot be built (pip cannot resolve, an image that does not exist, a
py_executable that cannot run Ray) fails each of its runs with one line naming the stack and the
installer's or interpreter's own error; fail-fast then skips
the rest of that stack. A child process that dies is dropped, and the trial fails so that Tune
retries it as any dead worker.
"""

from __future__ import annotations

import functools
import os
import shlex
import subprocess
import sys
import time

import ray
from ray.exceptions import RayActorError, RuntimeEnvSetupError
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from orchestrator.spec import ProbeSpec, RunSpec, expanded


def _quiet_exit(unraisable) -> None:
    """Ray stops a worker process by SIGTERM, whose handler raises SystemExit; when the signal lands
    in a weakref callback Python cannot raise it there and prints "Exception ignored in ...
    SystemExit: 1" instead, which Ray forwards to the sweep's terminal after the tables. The process
    exits either way: that one message is dropped, every other unraisable error still printed."""
    if not isinstance(unraisable.exc_value, SystemExit):
        sys.__unraisablehook__(unraisable)


sys.unraisablehook = _quiet_exit  # in every coordinator and child process: both import this module

# What a coordinating trial reserves: a Ray worker process that only waits on its child, so memory
# (bytes) and no CPU: a node's cores all go to the processes that train.
COORDINATOR = {"memory": 64 * 2**20}


def process_resources(run: RunSpec | ProbeSpec) -> dict[str, float]:
    """The resources of the process that trains. A named accelerator adds a sliver of the
    `accelerator_type:X` resource that only nodes with that GPU advertise: that pins the run."""
    req = {"CPU": run.cpus, "GPU": run.gpus}
    if run.accelerator != "any":
        req[f"accelerator_type:{run.accelerator}"] = 0.001
    return {k: v for k, v in req.items() if v}


def in_trial(run: RunSpec | ProbeSpec) -> bool:
    """A one-process run whose stack changes nothing in the environment (`launch`) runs in the
    trial's own process, which is that environment: a child would cost a process start and a torch
    import per pool and slot (measured: 58 s instead of 44 s for the spine's sweep tests)."""
    return run.world_size == 1 and not run.stack.runtime_env()


def bundles(run: RunSpec | ProbeSpec) -> list[dict[str, float]]:
    """The trial's placement group: the training process's bundle when the trial trains itself;
    else the coordinator's, then the child's; at world size > 1 the coordinator's alone (Ray Train
    reserves its workers in a placement group of its own)."""
    if in_trial(run):
        return [process_resources(run)]
    return [COORDINATOR] + ([process_resources(run)] if run.world_size == 1 else [])


def run_here(spec: RunSpec | ProbeSpec, out: str) -> dict:
    from orchestrator import probe, runner

    return probe.run(spec, out) if isinstance(spec, ProbeSpec) else runner.run(spec, out)


@ray.remote
class Replica:
    """A process in one stack's environment that runs replicas and probes, one after another."""

    def pid(self) -> int:
        return os.getpid()

    def run(self, spec_json: str, out: str) -> dict:
        return run_here(expanded(spec_json), out)


_CHILDREN: dict[str, ray.actor.ActorHandle] = {}  # per coordinator process: the child of its pool's stack


def _child(spec: RunSpec | ProbeSpec) -> ray.actor.ActorHandle:
    """This coordinator's child for the spec's stack, started (and its environment built) on first use."""
    key = spec.stack.model_dump_json() + repr(bundles(spec))
    if key not in _CHILDREN:
        for old in _CHILDREN.values():  # its bundle is the new child's: one child at a time
            ray.kill(old)
        _CHILDREN.clear()
        resources = process_resources(spec)
        options = {"num_cpus": resources.pop("CPU", 0), "num_gpus": resources.pop("GPU", 0), "resources": resources,
                   "scheduling_strategy": PlacementGroupSchedulingStrategy(
                       ray.util.get_current_placement_group(), placement_group_bundle_index=1)}
        if env := spec.stack.runtime_env():
            options["runtime_env"] = env
        child = Replica.options(**options).remote()
        if {"pip", "uv", "image_uri"} & set(env):
            print(f"stack {spec.stack.name}: building its environment on this node for the first run here "
                  f"({', '.join(f'{k}: {v}' for k, v in env.items() if k != 'env_vars')}); "
                  "Ray caches it per node", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            ray.get(child.pid.remote())  # raises RuntimeEnvSetupError when it cannot be built
            print(f"stack {spec.stack.name}: environment ready after {time.perf_counter() - t0:.0f} s",
                  file=sys.stderr, flush=True)
        _CHILDREN[key] = child
    return _CHILDREN[key]


@functools.cache
def python_error(py_executable: str) -> str | None:
    """Why `py_executable` cannot run a Ray worker on this node, or None. Ray retries a worker
    process that dies at start for ever, so a stack naming a missing interpreter, or one without
    Ray, would leave its runs waiting: the coordinator, on the child's node, asks it first (~1 s,
    once per process)."""
    try:
        r = subprocess.run([*shlex.split(py_executable), "-c", "import ray"], capture_output=True, text=True,
                           timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"py_executable {py_executable!r} cannot start here: {e}"
    return None if r.returncode == 0 else (f"py_executable {py_executable!r} cannot import ray "
                                           f"(exit {r.returncode}): {last_line(r.stderr)}")


def last_line(text: str, saying: str = "") -> str:
    """The line of an error text that names the cause, for a one-line row: installers, interpreters
    and Ray put it last; with `saying`, the last line that contains it (Ray's traceback follows pip's)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    said = [line for line in lines if saying and saying in line.lower() and not line.startswith("Traceback")]
    return (said or lines or ["no error text"])[-1][:500]


def stack_error(spec: RunSpec | ProbeSpec, error: RuntimeEnvSetupError) -> str:
    """One line naming the stack and the installer's own error (its last line that says so)."""
    return f"stack {spec.stack.name}: its environment could not be built: {last_line(str(error), 'error')}"


def failed(spec: RunSpec | ProbeSpec, out: str, error: str) -> dict:
    """Record a run that failed before its own process could say so, and return its summary row.
    A probe has no row: its error goes to the console, which the sweep's last lines point to."""
    if isinstance(spec, RunSpec):
        from orchestrator import runner, store

        fs, root = store.resolve(out)
        store.write_run(fs, root, runner.base_row(spec) | {"status": "failed", "error": error})
    else:
        print(f"overhead probe {spec.probe_id} failed: {error}", file=sys.stderr, flush=True)
    return {"status": "failed", "error": error}


def execute(spec: RunSpec | ProbeSpec, out: str) -> dict:
    """Run a replica or probe in its stack's process and return its summary row: a run whose stack
    cannot be built is recorded failed here (the child never ran), with the installer's error."""
    if spec.stack.py_executable and (error := python_error(spec.stack.py_executable)):
        return failed(spec, out, f"stack {spec.stack.name}: its environment could not be built: {error}")
    if spec.world_size > 1:
        return distributed(spec, out)
    if in_trial(spec):
        return run_here(spec, out)
    try:
        return ray.get(_child(spec).run.remote(spec.model_dump_json(), out))
    except RuntimeEnvSetupError as e:
        _CHILDREN.clear()
        return failed(spec, out, stack_error(spec, e))
    except RayActorError:
        _CHILDREN.clear()  # the child died: Tune retries the trial, which starts a new one
        raise


def _rank_main(config: dict) -> None:
    """One rank of a data-parallel replica, inside a Ray Train worker (process group set up)."""
    import ray.train
    import ray.train.torch

    from orchestrator import runner
    from workloads.train import Rank

    ctx = ray.train.get_context()
    rank = Rank(ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank(), ray.train.torch.get_device())
    runner.run(expanded(config["spec"]), config["out"], rank)


def rank_error(spec: RunSpec, failures: dict[int, Exception]) -> str:
    """One line naming every failed rank with its error's own last line, the ranks that failed on
    their own first: when one rank raises, the others often fail next in a collective whose peer
    went away, and that is not the cause."""
    def last(error: Exception) -> str:
        return last_line(str(error).strip() or type(error).__name__)[:300]

    def knock_on(item: tuple[int, Exception]) -> tuple[bool, int]:
        return any(w in last(item[1]) for w in ("gloo", "NCCL", "Connection closed", "peer")), item[0]

    return "; ".join(f"rank {r} of {spec.world_size}: {last(e)}" for r, e in sorted(failures.items(), key=knock_on))


def distributed(spec: RunSpec, out: str) -> dict:
    """World size k > 1: one Ray Train run (Train V2, started from this trial as Ray documents it)
    of k workers, each with the run's resources and in the run's stack (`worker_runtime_env`);
    gloo on CPUs, NCCL on GPUs. A rank that raises fails the replica with the rank and its error;
    a rank whose process dies fails the trial, which Tune retries as any dead worker."""
    import uuid

    from ray.train import FailureConfig, RunConfig, ScalingConfig, TrainingFailedError, WorkerGroupError
    from ray.train.torch import TorchConfig, TorchTrainer

    # Train's controller polls its workers every 2 s by default: the end of a short replica waited
    # for it (measured 12 s -> 10.5 s per trivial 2-worker run at 0.2 s); it reads this at start
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    gpu = spec.gpus > 0
    trainer = TorchTrainer(
        _rank_main, train_loop_config={"spec": spec.model_dump_json(), "out": out},
        scaling_config=ScalingConfig(num_workers=spec.world_size, use_gpu=gpu,
                                     resources_per_worker=process_resources(spec)),
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        run_config=RunConfig(name=f"{spec.run_id}-{uuid.uuid4().hex[:8]}", storage_path=f"{out}/tune/train",
                             worker_runtime_env=spec.stack.runtime_env(), failure_config=FailureConfig(max_failures=0)))
    try:
        trainer.fit()
    except WorkerGroupError as e:
        if any(isinstance(f, RayActorError) for f in e.worker_failures.values()):
            raise  # a rank's process died: retried by Tune, recorded by the sweep as a dead worker
        return failed(spec, out, rank_error(spec, e.worker_failures))
    except TrainingFailedError as e:  # the workers never ran: e.g. the stack cannot be built for them
        return failed(spec, out, f"Ray Train could not start {spec.world_size} workers in stack "
                                 f"{spec.stack.name}: {last_line(str(e))}")
    return {"status": "ok", "error": None}
