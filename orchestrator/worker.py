"""Where a Tune trial's replica or probe executes: in the trial's own process, or in a warm group
of processes of the run's software stack, one per data-parallel rank.

    launch stack, world size 1:   Tune trial, holding the run's resources, trains in its own process
    any other run:                Tune trial (coordinator: memory only) --> k Replica actors (k = world
                                  size), each in the stack's environment with the run's resources,
                                  at k > 1 joined once in a torch process group (gloo / NCCL)

Tune has no per-trial runtime_env (ray-project/ray#23234), so a trial whose run needs another
environment or more than one process starts child actors in the other bundles of its own placement
group, whose first bundle (the coordinator's) holds no CPU and no GPU. Ray sets the stack's
environment variables and interpreter when a child starts, before torch is imported and CUDA starts.
Tune reuses a trial's actor, and with it its placement group, for the next trial of the same pool
(one stack, determinism mode and world size: `sweep.pools`), so the children are started once per
coordinator and stay warm: torch imported, dataset cached, CUDA up, process group set up. Ray Train
cannot do that for ranks: each `TorchTrainer.fit()` starts a new worker group and tears it down at
the end of the run (Train V2's controller owns the group's lifetime, `ray.train.v2` WorkerGroup), which
cost ~12 s of start-up per 2-rank replica here, and its public API has no way to keep a group
between fits; a group of actors with a process group set up once is the pattern verl and OpenRLHF
use on Ray.

A pip or uv stack is built by `orchestrator.stacks` on each node that runs it (once, reused across
sweeps) and its children start with that interpreter. A stack that cannot be built (the installer
refuses its requirements, an image that does not exist, a py_executable that cannot run Ray) fails
each of its runs with one line naming the stack and the installer's or interpreter's own error;
fail-fast then skips the rest of that stack. A child that dies (killed, out of memory) is replaced
and the replica run again, `max_retries` times, the number of tries in the row's `attempts`; a rank
that raises fails its replica with the rank's error, and the group is started anew for the next.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time

import ray
from ray.exceptions import RayActorError, RuntimeEnvSetupError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from orchestrator import stacks
from orchestrator.axes import Stack
from orchestrator.spec import ProbeSpec, RunSpec, expanded
from orchestrator.stacks import last_line


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
    else the coordinator's, then one per rank (the children's). Ray packs them on one node where
    they fit and spreads the ranks over nodes where they do not."""
    if in_trial(run):
        return [process_resources(run)]
    return [COORDINATOR] + [process_resources(run)] * run.world_size


def run_here(spec: RunSpec | ProbeSpec, out: str, rank=None, attempts: int = 1) -> dict:
    from orchestrator import probe, runner
    from workloads.train import SOLO

    if isinstance(spec, ProbeSpec):
        return probe.run(spec, out)
    return runner.run(spec, out, rank or SOLO, attempts)


@ray.remote
class Replica:
    """A process in one stack's environment that runs replicas and probes one after another; in a
    data-parallel group, one rank, its process group set up once for every replica it runs."""

    def __init__(self):
        self.rank = None

    def endpoint(self) -> tuple[str, int]:
        """Where rank 0 listens for the others when the group forms: this node and a free port."""
        import socket

        with socket.socket() as s:
            s.bind(("", 0))
            return ray.util.get_node_ip_address(), s.getsockname()[1]

    def join(self, rank: int, world_size: int, local_rank: int, local_world_size: int, address: str, port: int,
             gpu: bool) -> int:
        """Set up this rank's process group, and export torchrun's variables for it: frameworks that
        detect a distributed run from the environment (accelerate's PartialState under the Hugging
        Face Trainer, Lightning's environments) then see these ranks and reuse the group, which
        stays set up for every replica this process runs."""
        import torch.distributed as dist

        from workloads.train import Rank

        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(local_rank),
                          LOCAL_WORLD_SIZE=str(local_world_size), MASTER_ADDR=address, MASTER_PORT=str(port))
        dist.init_process_group("nccl" if gpu else "gloo", init_method=f"tcp://{address}:{port}",
                                rank=rank, world_size=world_size)
        self.rank = Rank(rank, world_size, local_rank)
        return os.getpid()

    def run(self, spec_json: str, out: str, attempts: int) -> dict:
        return run_here(expanded(spec_json), out, self.rank, attempts)

    def healthy(self) -> bool:
        """After a replica failed on some rank but every rank returned: whether the process group
        still works, checked by gloo's monitored barrier (a broken pair fails it within GRACE_S)."""
        if self.rank is None:
            return True
        from datetime import timedelta

        import torch.distributed as dist

        try:
            dist.monitored_barrier(timeout=timedelta(seconds=GRACE_S))
            return True
        except RuntimeError:
            return False


@ray.remote(num_cpus=0)
def prepare(stack_json: str) -> dict:
    """On one node, in the launch environment: the runtime_env of the stack's children there, its
    pip/uv environment built first when this node has none, or {"error": the installer's or
    interpreter's line}. Runs where the children will, since each node keeps its own builds."""
    stack = Stack.model_validate_json(stack_json)
    env = {"env_vars": stack.env_vars} if stack.env_vars else {}
    if stack.image_uri:
        return env | {"image_uri": stack.image_uri}
    try:
        python = stacks.build(stack) if (stack.pip or stack.uv) else stack.py_executable
    except stacks.BuildError as e:
        return {"error": str(e)}
    if python and (error := python_error(python)):
        return {"error": error}
    return env | ({"py_executable": python} if python else {})


def python_error(py_executable: str) -> str | None:
    """Why `py_executable` cannot run a Ray worker on this node, or None. Ray retries a worker
    process that dies at start for ever, so a stack naming a missing interpreter, or one without
    Ray, would leave its runs waiting: it is asked first (~1 s per group start)."""
    try:
        r = subprocess.run([*shlex.split(py_executable), "-c", "import ray"], capture_output=True, text=True,
                           timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"py_executable {py_executable!r} cannot start here: {e}"
    return None if r.returncode == 0 else (f"py_executable {py_executable!r} cannot import ray "
                                           f"(exit {r.returncode}): {last_line(r.stderr)}")


class StackError(RuntimeError):
    """The stack's environment cannot be had on a node: deterministic, the run fails, never retried."""


_GROUP: dict[str, list] = {}  # per coordinator process: the children of its pool's stack and world size


def release() -> None:
    """Stop this coordinator's children: their bundles are free for the next group."""
    for children in _GROUP.values():
        for child in children:
            ray.kill(child)
    _GROUP.clear()


def _start(spec: RunSpec | ProbeSpec) -> list:
    """Start one child per rank in bundles 1..k of this trial's placement group, each in the stack's
    environment as prepared on its node; at k > 1 join them in a process group (rank 0 listens)."""
    pg = ray.util.get_current_placement_group()
    nodes = ray.util.placement_group_table(pg)["bundles_to_node_id"]
    resources = process_resources(spec)
    envs: dict[str, dict] = {}
    children = []
    for i in range(spec.world_size):
        node = nodes[i + 1]
        if node not in envs:
            t0 = time.perf_counter()
            envs[node] = ray.get(prepare.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
                                 .remote(spec.stack.model_dump_json()))
            if "error" in envs[node]:
                raise StackError(envs[node]["error"])
            if (took := time.perf_counter() - t0) > 5:
                print(f"stack {spec.stack.name}: environment ready on node {node[:8]} after {took:.0f} s "
                      "(kept for later sweeps: python -m orchestrator.stacks list)", file=sys.stderr, flush=True)
        options = {"num_cpus": resources.get("CPU", 0), "num_gpus": resources.get("GPU", 0),
                   "resources": {k: v for k, v in resources.items() if k not in ("CPU", "GPU")},
                   "scheduling_strategy": PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i + 1)}
        children.append(Replica.options(**options, **({"runtime_env": envs[node]} if envs[node] else {})).remote())
    if spec.world_size > 1:
        address, port = ray.get(children[0].endpoint.remote())
        ranks = [nodes[i + 1] for i in range(spec.world_size)]  # each rank's node
        ray.get([c.join.remote(i, spec.world_size, ranks[:i].count(node), ranks.count(node), address, port,
                               spec.gpus > 0) for i, (c, node) in enumerate(zip(children, ranks))])
    return children


def _group(spec: RunSpec | ProbeSpec) -> list:
    """This coordinator's children for the spec's stack and world size, started on first use."""
    key = spec.stack.model_dump_json() + repr(bundles(spec))
    if key not in _GROUP:
        release()  # their bundles are the new group's: one group at a time
        _GROUP[key] = _start(spec)
    return _GROUP[key]


GRACE_S = 5.0  # after one rank fails: how long the others get to fail or finish before the group is stopped


def _outcomes(children: list, spec: RunSpec | ProbeSpec, out: str, attempts: int) -> tuple[dict | None, dict, bool]:
    """Run the replica on every child: rank 0's row, the ranks that failed, and whether every rank
    returned. When one rank fails, the others usually wait in a collective for it: they get GRACE_S,
    then the group is given up."""
    futures = [c.run.remote(spec.model_dump_json(), out, attempts) for c in children]
    rows, failures, pending = {}, {}, list(futures)
    while pending:
        done, pending = ray.wait(pending, num_returns=1, timeout=GRACE_S if failures else None)
        if not done:
            break
        for f in done:
            try:
                rows[futures.index(f)] = ray.get(f)
            except Exception as e:  # noqa: BLE001 - a rank's own error, or its process died (RayActorError)
                failures[futures.index(f)] = e
    return rows.get(0), failures, not pending


def _reusable(children: list, spec: RunSpec | ProbeSpec, failures: dict, settled: bool) -> bool:
    """Whether a group whose replica failed can run the next one: on CPUs, when every rank returned
    (none died, none waits in a collective: a bug that hits every rank alike) and the process group
    passes a barrier; a user's bug that fails every replica then costs no group start per replica.
    One rank's error leaves the others waiting in the harness's closing gather, so that group is
    rebuilt; GPU groups always are: an error can leave a CUDA context or an NCCL communicator unusable."""
    if not settled or spec.gpus or any(isinstance(e, RayActorError) for e in failures.values()):
        return False
    return all(ray.get([c.healthy.remote() for c in children]))


def execute(spec: RunSpec | ProbeSpec, out: str) -> dict:
    """Run a replica or probe where it belongs and return its summary row. A run whose stack cannot
    be had is recorded failed here (no child ever ran it); a child that died is replaced and the run
    tried again up to `max_retries` times; a rank that raised fails the replica naming it."""
    if in_trial(spec):
        return run_here(spec, out)
    died = []
    while True:
        try:
            children = _group(spec)
            row, failures, settled = _outcomes(children, spec, out, attempts=len(died) + 1)
        except (StackError, RuntimeEnvSetupError) as e:
            release()
            return failed(spec, out, f"stack {spec.stack.name}: its environment could not be built: "
                                     f"{last_line(str(e), 'error')}")
        if not failures:
            return row
        if not _reusable(children, spec, failures, settled):
            release()  # ranks dead, stuck in a collective or on a GPU: the next replica starts a fresh group
        dead = {r: e for r, e in failures.items() if isinstance(e, RayActorError)}
        if not dead:
            return failed(spec, out, rank_error(spec, failures))
        died.append(rank_error(spec, dead))
        if len(died) > spec.max_retries:
            return failed(spec, out, f"worker died in each of {len(died)} attempts: {died[-1]}", len(died))
        ident = spec.run_id if isinstance(spec, RunSpec) else spec.probe_id
        print(f"{ident}: worker died ({died[-1]}); "
              f"attempt {len(died) + 1} of {spec.max_retries + 1}", file=sys.stderr, flush=True)


def failed(spec: RunSpec | ProbeSpec, out: str, error: str, attempts: int = 1) -> dict:
    """Record a run that failed before its own process could say so, and return its summary row.
    A probe has no row: its error goes to the console, which the sweep's last lines point to."""
    if isinstance(spec, RunSpec):
        from orchestrator import runner, store

        fs, root = store.resolve(out)
        store.write_run(fs, root, runner.base_row(spec) | {"status": "failed", "error": error, "attempts": attempts})
    else:
        print(f"overhead probe {spec.probe_id} failed: {error}", file=sys.stderr, flush=True)
    return {"status": "failed", "error": error}


def rank_error(spec: RunSpec | ProbeSpec, failures: dict[int, Exception]) -> str:
    """One line naming every failed rank with its error's own last line, the ranks that failed on
    their own first: when one rank raises, the others often fail next in a collective whose peer
    went away, and that is not the cause. At world size 1 the child's own error alone."""
    def last(error: Exception) -> str:
        return last_line(str(error).strip() or type(error).__name__)[:300]

    def knock_on(item: tuple[int, Exception]) -> tuple[bool, int]:
        return any(w in last(item[1]) for w in ("gloo", "NCCL", "Connection closed", "peer")), item[0]

    if spec.world_size == 1:
        return "; ".join(last(e) for e in failures.values())
    return "; ".join(f"rank {r} of {spec.world_size}: {last(e)}" for r, e in sorted(failures.items(), key=knock_on))
