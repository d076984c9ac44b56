"""Where a Tune trial's replica or probe executes: in a warm process of the run's software stack,
or, for a data-parallel replica (world size k > 1), in a Ray Train run of k processes.

    Tune trial (coordinator; memory only) --spec--> Replica actor: runtime_env = the run's stack,
                                          |                        resources = the run's (CPUs, GPU, accelerator)
                                          +-------> TorchTrainer: k workers, each with the run's resources,
                                                    worker_runtime_env = the run's stack

Tune has no per-trial runtime_env (ray-project/ray#23234), so the trial starts a child actor with
the stack's runtime_env in the second bundle of the trial's own placement group, whose first bundle
(the coordinator's) holds no CPU and no GPU. Ray sets the stack's environment variables and
packages when that process starts, before torch is imported and CUDA starts. Tune reuses a trial's
actor, and with it its placement group, for the next trial of the same pool (one stack, one
determinism mode, see `sweep.pools`), so the child is created once per coordinator and stays warm:
torch imported, dataset cached, CUDA up.

A stack whose environment cannot be built (pip cannot resolve, an image that does not exist) fails
each of its runs with one line naming the stack and the installer's own error; fail-fast then skips
the rest of that stack. A child process that dies is dropped, and the trial fails so that Tune
retries it as any dead worker.
"""

from __future__ import annotations

import os
import sys
import time

import ray
from ray.exceptions import RayActorError, RuntimeEnvSetupError
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from orchestrator.spec import ProbeSpec, RunSpec

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


def bundles(run: RunSpec | ProbeSpec) -> list[dict[str, float]]:
    """The trial's placement group: the coordinator's bundle, then the training process's. At world
    size > 1 the coordinator's alone: Ray Train reserves its workers in a placement group of its own."""
    return [COORDINATOR] + ([process_resources(run)] if run.world_size == 1 else [])


@ray.remote
class Replica:
    """A process in one stack's environment that runs replicas and probes, one after another."""

    def pid(self) -> int:
        return os.getpid()

    def run(self, probe: bool, spec_json: str, out: str) -> dict:
        from orchestrator import probe as probes
        from orchestrator import runner

        if probe:
            return probes.run(ProbeSpec.model_validate_json(spec_json), out)
        return runner.run(RunSpec.model_validate_json(spec_json), out)


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


def stack_error(spec: RunSpec | ProbeSpec, error: RuntimeEnvSetupError) -> str:
    """One line naming the stack and the installer's own error (its last line that says something)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    said = [line for line in lines if "error" in line.lower() and not line.startswith("Traceback")]
    return (f"stack {spec.stack.name}: its environment could not be built: "
            f"{(said or lines or ['no error text'])[-1][:500]}")


def execute(spec: RunSpec | ProbeSpec, out: str) -> dict:
    """Run a replica or probe in its stack's process and return its summary row: a run whose stack
    cannot be built is recorded failed here (the child never ran), with the installer's error."""
    if isinstance(spec, RunSpec) and spec.world_size > 1:
        return distributed(spec, out)
    try:
        return ray.get(_child(spec).run.remote(isinstance(spec, ProbeSpec), spec.model_dump_json(), out))
    except RuntimeEnvSetupError as e:
        _CHILDREN.clear()
        error = stack_error(spec, e)
        if isinstance(spec, RunSpec):
            from orchestrator import runner, store

            fs, root = store.resolve(out)
            store.write_run(fs, root, runner.base_row(spec) | {"status": "failed", "error": error})
        print(f"failed: {error}", file=sys.stderr, flush=True)
        return {"status": "failed", "error": error}
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
    runner.run(RunSpec.model_validate_json(config["spec"]), config["out"], rank)


def rank_error(spec: RunSpec, failures: dict[int, Exception]) -> str:
    """One line naming every failed rank with its error's own last line, the ranks that failed on
    their own first: when one rank raises, the others often fail next in a collective whose peer
    went away, and that is not the cause."""
    def last(error: Exception) -> str:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        return (lines or [type(error).__name__])[-1][:300]

    def knock_on(item: tuple[int, Exception]) -> tuple[bool, int]:
        return any(w in last(item[1]) for w in ("gloo", "NCCL", "Connection closed", "peer")), item[0]

    return "; ".join(f"rank {r} of {spec.world_size}: {last(e)}" for r, e in sorted(failures.items(), key=knock_on))


def distributed(spec: RunSpec, out: str) -> dict:
    """World size k > 1: one Ray Train run (Train V2, started from this trial as Ray documents it)
    of k workers, each with the run's resources and in the run's stack (`worker_runtime_env`);
    gloo on CPUs, NCCL on GPUs. A rank that raises fails the replica with the rank and its error;
    a rank whose process dies fails the trial, which Tune retries as any dead worker."""
    import uuid

    from ray.exceptions import RayActorError
    from ray.train import FailureConfig, RunConfig, ScalingConfig, WorkerGroupError
    from ray.train.torch import TorchConfig, TorchTrainer

    from orchestrator import runner, store

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
        error = rank_error(spec, e.worker_failures)
        fs, root = store.resolve(out)
        store.write_run(fs, root, runner.base_row(spec) | {"status": "failed", "error": error})
        return {"status": "failed", "error": error}
    return {"status": "ok", "error": None}
