"""One writer per OUT: a lease taken before a command writes or deletes anything under OUT.

Two sweeps on one OUT (another sweep with `--fresh`, or the same spec started twice) deleted each
other's rows and trained runs twice; a `compact` or a `reduce` meanwhile rewrote files under a
writer. Whoever writes under OUT holds `OUT/.lease`, which names the holder (host, PID, start
time, command); a second command is refused in one line naming the holder (exit 2).

- On a file system the lease is an advisory lock (`flock`) on that file: the kernel releases it
  when the holder's process ends, however it ends, so a dead holder's lease is free at once.
- On object storage there are no locks: the lease is an object the holder rewrites every BEAT_S
  seconds; one whose last beat is older than TTL_S, or whose holder's process on this host is gone,
  is a dead holder's and is taken over. Two
  commands starting within a second of each other could both write it: each reads it back after a
  pause and only the one whose lease it finds proceeds.

A process may take the lease of an OUT it already holds (the sweep reduces its own OUT at the end).
The workers of a sweep write their rows under the sweep's lease.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

from orchestrator import store

NAME = ".lease"
TTL_S = 120.0
BEAT_S = 30.0
_HELD: set[str] = set()


class LeaseError(store.StoreError):
    """OUT is another command's to write: one line naming the holder."""


def _me(command: str) -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(), "command": command,
            "beat": time.time()}


def _refusal(out: str, holder: dict) -> LeaseError:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return LeaseError(f"--out: {out} is being written by `{holder.get('command', '?')}` (pid {holder.get('pid')} "
                      f"on {holder.get('host')}, since {since}); wait for it to end, or give another --out")


@contextlib.contextmanager
def held(out: str, command: str | None = None):
    """Hold OUT's lease for the block; raises LeaseError when another command holds it."""
    out = store.absolute(out)
    if out in _HELD:
        yield
        return
    command = command or " ".join(["python -m", Path(sys.argv[0]).stem if sys.argv[0] else "?", *sys.argv[1:]])
    fs, root = store.resolve(out)
    hold = _local if store.is_local(fs) else _remote
    with hold(out, fs, root, _me(command)):
        _HELD.add(out)
        try:
            yield
        finally:
            _HELD.discard(out)


@contextlib.contextmanager
def _local(out: str, fs, root: str, me: dict):
    folder = Path(root)
    created, new = not folder.exists(), not (folder / NAME).exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        f = open(folder / NAME, "a+")
    except OSError as e:
        raise store.unreachable(out, e) from None
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise _refusal(out, json.loads(f.read() or "{}")) from None
        try:
            f.seek(0)
            f.truncate()
            f.write(json.dumps(me))
            f.flush()
            os.fsync(f.fileno())  # a full disk says so here, before Ray starts
        except OSError as e:
            raise store.unreachable(out, e) from None
        try:
            yield
        finally:
            f.truncate(0)  # released: the file names a holder only while one holds it
    finally:
        if new and {p.name for p in folder.iterdir()} == {NAME}:  # a refused command leaves nothing
            (folder / NAME).unlink()
            if created:
                folder.rmdir()
        f.close()  # the lock goes with the file


def _dead_here(holder: dict) -> bool:
    """A holder on this host whose process is gone (or is this one: it released the lease but could
    not delete it, as when the storage was down)."""
    if holder.get("host") != socket.gethostname():
        return False
    if holder.get("pid") == os.getpid():
        return True
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except (PermissionError, KeyError, TypeError):
        return False
    return False


@contextlib.contextmanager
def _remote(out: str, fs, root: str, me: dict):
    path = f"{root}/{NAME}"

    def read() -> dict | None:
        return json.loads(store.read_bytes(fs, path)) if store.exists(fs, path) else None

    try:
        holder = read()
        if holder and time.time() - holder["beat"] < TTL_S and not _dead_here(holder):
            raise _refusal(out, holder)
        store.write_bytes(fs, path, json.dumps(me).encode())
        time.sleep(1.0)  # a command that wrote at the same moment: the object holds one of the two
        if (holder := read()) and (holder["host"], holder["pid"], holder["started"]) != (me["host"], me["pid"],
                                                                                          me["started"]):
            raise _refusal(out, holder)
    except (OSError, ValueError) as e:
        if isinstance(e, LeaseError):
            raise
        raise store.unreachable(out, e) from None
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(BEAT_S):
            with contextlib.suppress(OSError):  # a missed beat, not retried: the lease lasts TTL_S
                store.write_bytes(fs, path, json.dumps(me | {"beat": time.time()}).encode(), tries=1)

    beating = threading.Thread(target=beat, daemon=True, name="out-lease")
    beating.start()
    try:
        yield
    finally:
        stop.set()
        # a beat in flight lands before the delete: one retried through an outage rewrote the released
        # lease after it, and the same process's resume found itself refused by its own old lease
        beating.join()
        with contextlib.suppress(OSError):
            fs.delete_file(path)
