"""Stack environments this tool builds, kept per node and reused across sweeps.

A `pip` or `uv` stack is a virtualenv that holds only the packages the stack pins (and their
dependencies), built by uv from its cache, with the launch environment's site-packages layered
*after* its own (a `.pth` line): the pinned versions win, everything else (Ray, torch, this package)
is the launch environment's, not a copy. Ray then starts the stack's workers with that
interpreter (`py_executable`). Ray's own `pip` runtime_env copied the whole launch virtualenv (6.3 GB
with torch's CUDA wheels) into the session folder per stack and node before pip ran, retried a
failed build three times, and never deleted the copies.

An environment lives in `$TOOLING_NOISE_STACKS` (default `~/.cache/tooling-noise/stacks`), in a
folder named by a digest of everything that defines it (the requirements, the installer, the
launch environment it layers on), written complete with a `ready.json` last: a folder without it is
a build that died, rebuilt under a lock. `python -m orchestrator.stacks list|delete` shows and
deletes them on this node (the tool deletes nothing it did not build).
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from orchestrator.axes import Stack

READY = "ready.json"


class BuildError(RuntimeError):
    """The installer refused the stack's requirements: deterministic, so never retried."""


def last_line(text: str, saying: str = "") -> str:
    """The line of an error text that names the cause, for a one-line row: installers, interpreters
    and Ray put it last; with `saying`, the last line that contains it (Ray's traceback follows pip's)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    said = [line for line in lines if saying and saying in line.lower() and not line.startswith("Traceback")]
    return (said or lines or ["no error text"])[-1][:500]


def home() -> Path:
    return Path(os.environ.get("TOOLING_NOISE_STACKS", "~/.cache/tooling-noise/stacks")).expanduser()


def launch_site() -> str:
    """The launch environment's site-packages, which a built stack layers under its own."""
    return sysconfig.get_paths()["purelib"]


def key(stack: Stack) -> str:
    """The folder name of a stack's environment: its requirements and what it layers on, not its name
    (two stacks pinning the same packages share one environment)."""
    what = {"installer": "uv" if stack.uv else "pip", "requirements": sorted(stack.pip or stack.uv or []),
            "python": sys.version, "launch": launch_site()}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def uv() -> str:
    from uv import find_uv_bin

    return find_uv_bin()


def _install(folder: Path, requirements: list[str]) -> None:
    """uv builds the virtualenv, layers the launch site-packages after its own, then installs the
    requirements; uv resolves before it downloads, so an unresolvable requirement fails in about a
    second with uv's own words."""
    def step(*args: str) -> None:
        r = subprocess.run([uv(), *args], capture_output=True, text=True, timeout=3600)
        if r.returncode:  # uv's message, wrapped to the terminal's width, as one line
            raise BuildError(" ".join((r.stderr or r.stdout).split())[:500])

    step("venv", "--quiet", str(folder), "--python", sys.executable)
    python = folder / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # `import` lines of a .pth run at start-up: addsitedir also reads the launch site's own .pth
    # files (an editable install of this package, for one)
    Path(site, "_tooling_noise_launch.pth").write_text(f"import site; site.addsitedir({launch_site()!r})\n")
    step("pip", "install", "--quiet", "--python", str(python), *requirements)


def built(stack: Stack) -> bool:
    """Whether this node holds the stack's environment, ready (a sweep's ETA counts the builds ahead)."""
    return (home() / key(stack) / READY).exists()


def build(stack: Stack) -> str:
    """The interpreter of the stack's environment on this node, built the first time (under a lock,
    so concurrent runs on a node build it once). Raises BuildError with the installer's line."""
    folder = home() / key(stack)
    python = folder / "bin" / "python"
    if built(stack):
        return str(python)
    home().mkdir(parents=True, exist_ok=True)
    with open(home() / f"{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / READY).exists():
            shutil.rmtree(folder, ignore_errors=True)  # a build that died half-way
            t0 = time.perf_counter()
            try:
                _install(folder, stack.pip or stack.uv or [])
            except BaseException:
                shutil.rmtree(folder, ignore_errors=True)
                raise
            (folder / READY).write_text(json.dumps({
                "stack": stack.name, "requirements": stack.pip or stack.uv, "launch": launch_site(),
                "built": time.strftime("%Y-%m-%dT%H:%M:%S"), "build_s": round(time.perf_counter() - t0, 1)}))
    return str(python)


def size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def listed() -> list[dict]:
    """The environments this tool built on this node, with their definitions and sizes."""
    if not home().is_dir():
        return []
    return [json.loads((f / READY).read_text()) | {"key": f.name, "bytes": size(f)}
            for f in sorted(home().iterdir()) if (f / READY).exists()]


def delete(keys: list[str]) -> list[str]:
    """Delete the named environments (all of them when `keys` is empty); returns what was deleted.
    Only folders with this tool's `ready.json` or a dead build's lock are ever touched."""
    gone = []
    for entry in listed():
        if not keys or entry["key"] in keys:
            shutil.rmtree(home() / entry["key"])
            (home() / f"{entry['key']}.lock").unlink(missing_ok=True)
            gone.append(entry["key"])
    return gone


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.stacks",
                                     description="List or delete the stack environments built on this node.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list")
    rm = sub.add_parser("delete")
    rm.add_argument("keys", nargs="*", help="environment keys from `list`")
    rm.add_argument("--all", action="store_true", help="delete every environment this tool built here")
    args = parser.parse_args(argv)
    if args.command == "list":
        for e in listed():
            print(f"{e['key']}  {e['bytes'] / 2**20:8.1f} MB  {e['stack']}: {' '.join(e['requirements'])}  "
                  f"(built {e['built']} in {e['build_s']} s)")
        print(f"{len(listed())} environment(s) in {home()}")
        return 0
    if not args.keys and not args.all:
        print("delete: name environment keys (see `list`) or pass --all", file=sys.stderr)
        return 2
    for k in delete(args.keys):
        print(f"deleted {home() / k}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
