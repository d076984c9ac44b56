"""What a pip stack costs to have: Ray's own `pip` runtime_env (the old way) against the tool's
uv-built environment layered on the launch environment (`orchestrator.stacks`), side by side.

    python bench/bench_stacks.py   (~6 minutes on 2 cores, most of it the old way's copies)

For each way, on fresh local Ray clusters of 2 CPUs: the disk the stack's environment takes; the
seconds from asking for a task in the stack to its first result, on a new cluster with nothing built
(cold), on the same cluster again, and on a second new cluster (what a second sweep pays); and the
seconds until a misspelled requirement fails. The stack pins `six==1.16.0` (the launch environment
has 1.17.0), so the task's answer also shows the pin won. Goals (issue #30): disk <= the pinned
packages + 100 MB; a second sweep starts the stack in <= 5 s; a misspelled package fails in <= 15 s.
The physical minimum of the new way is a process start with the launch interpreter (~1 s with torch
not imported). Ray's copy lives in the session folder, deleted here after measuring it.
"""

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ray  # noqa: E402

from orchestrator import fingerprint, stacks  # noqa: E402
from orchestrator.axes import Stack  # noqa: E402

PIN = ["six==1.16.0"]
BROKEN = ["tooling-noise-no-such-package==0.0.1"]


@ray.remote(num_cpus=1)
def which_six() -> str:
    import six

    return six.__version__


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink()) if path.exists() else 0


def timed(runtime_env: dict) -> tuple[float, str]:
    t0 = time.perf_counter()
    try:
        got = ray.get(which_six.options(runtime_env=runtime_env).remote())
    except Exception as e:  # noqa: BLE001 - the failure is what is timed
        got = f"failed: {type(e).__name__}"
    return time.perf_counter() - t0, got


def cluster() -> Path:
    context = ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    return Path(context.address_info["session_dir"])


def old_way() -> dict:
    """Ray's pip runtime_env: built in the session folder per cluster, 3 tries on failure (Ray's default)."""
    session = cluster()
    cold, got = timed({"pip": PIN})
    again, _ = timed({"pip": PIN})
    disk = du(session / "runtime_resources")
    shutil.rmtree(session / "runtime_resources", ignore_errors=True)
    ray.shutdown()
    session = cluster()
    second, _ = timed({"pip": PIN})
    shutil.rmtree(session / "runtime_resources", ignore_errors=True)
    broken, said = timed({"pip": BROKEN})
    shutil.rmtree(session / "runtime_resources", ignore_errors=True)
    ray.shutdown()
    return {"disk": disk, "cold": cold, "again": again, "second": second, "broken": broken, "six": got,
            "broken_said": said}


def new_way() -> dict:
    """The tool's way: `stacks.build` on the node, then Ray starts the task with that interpreter."""
    stacks.delete([])
    cluster()
    t0 = time.perf_counter()
    python = stacks.build(Stack(name="pip", pip=PIN))
    build = time.perf_counter() - t0
    cold, got = timed({"py_executable": python})
    again, _ = timed({"py_executable": python})
    ray.shutdown()
    cluster()
    t0 = time.perf_counter()
    python = stacks.build(Stack(name="pip", pip=PIN))  # found ready
    second, _ = timed({"py_executable": python})
    second += time.perf_counter() - t0
    ray.shutdown()
    t0 = time.perf_counter()
    try:
        stacks.build(Stack(name="broken", pip=BROKEN))
        said = "built?"
    except stacks.BuildError as e:
        said = str(e)[:90]
    broken = time.perf_counter() - t0
    disk = sum(e["bytes"] for e in stacks.listed())
    stacks.delete([])
    return {"disk": disk, "cold": build + cold, "again": again, "second": second, "broken": broken, "six": got,
            "broken_said": said}


def main() -> None:
    with tempfile.TemporaryDirectory() as home, tempfile.TemporaryDirectory() as cache:
        os.environ.update(TOOLING_NOISE_STACKS=home, UV_CACHE_DIR=cache)  # cold: nothing built, nothing cached
        new = new_way()
    old = old_way()
    print(f"pip stack {PIN} on {fingerprint.cpu_model()}, launch venv {stacks.launch_site()}; "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'':34} {'Ray pip (old)':>14} {'uv layered (new)':>17} {'old / new':>10}")
    rows = [("disk per stack, MB", "disk", 2**20), ("cold: first task, new cluster, s", "cold", 1),
            ("same cluster again, s", "again", 1), ("second sweep (new cluster), s", "second", 1),
            ("misspelled package fails after, s", "broken", 1)]
    for label, k, unit in rows:
        print(f"{label:34} {old[k] / unit:14.2f} {new[k] / unit:17.2f} {old[k] / max(new[k], 1e-9):10.1f}")
    print(f"six imported in the task: old {old['six']}, new {new['six']}")
    print(f"misspelled: old {old['broken_said']}; new {new['broken_said']}")


if __name__ == "__main__":
    main()
