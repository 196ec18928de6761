"""One process per run folder: a lock file holding the holder's pid, host and process start time.

Created with O_EXCL, so of two processes starting on one folder only one gets it; removed at interpreter exit. A
lock whose process is gone (same host, no such pid, or the pid now belongs to a newer process) is taken over with a
warning; a lock from another host cannot be checked and is refused, naming the file to delete if that run is over.
"""
from __future__ import annotations

import atexit
import json
import os
import socket
import sys
from pathlib import Path
from typing import Optional

from hwtools.errors import UserError

LOCK_FILE = "run.lock"


def _start_time(pid: int) -> Optional[str]:
    """The process's start time in clock ticks since boot (Linux), telling a reused pid from the original."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22; the command name in (...) may hold spaces


def _alive(holder: dict) -> bool:
    pid = int(holder.get("pid", -1))
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    start = holder.get("start")
    return start is None or _start_time(pid) in (None, start)


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _held_by_other(path: Path) -> Optional[dict]:
    """The live holder of the lock at `path` if it is another process, else None (no lock, ours, or stale)."""
    holder = _read(path)
    if not holder:
        return None
    if holder.get("host") != socket.gethostname():
        return holder
    if int(holder.get("pid", -1)) == os.getpid() or not _alive(holder):
        return None
    return holder


def _refuse(path: Path, holder: dict) -> UserError:
    where = f"pid {holder.get('pid')} on host {holder.get('host')}"
    hint = "" if holder.get("host") == socket.gethostname() else f" (if that run is over, delete {path})"
    return UserError(f"{path.parent} is in use by another run: {where}{hint}")


def check_run_lock(run_dir: Path) -> None:
    """Raise if another live process holds the run folder (call before touching anything in it)."""
    path = Path(run_dir) / LOCK_FILE
    holder = _held_by_other(path)
    if holder is not None:
        raise _refuse(path, holder)


_held: set[Path] = set()  # the locks this process took: released when its recipe ends (cli_main) or at exit


def acquire_run_lock(run_dir: Path) -> Path:
    """Take the run folder's lock (taking over a stale one with a warning); released at interpreter exit."""
    path = Path(run_dir) / LOCK_FILE
    me = {"pid": os.getpid(), "host": socket.gethostname(), "start": _start_time(os.getpid())}
    tmp = path.with_name(f".{LOCK_FILE}.{os.getpid()}")
    tmp.write_text(json.dumps(me), encoding="utf-8")
    try:
        return _link_lock(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _link_lock(tmp: Path, path: Path) -> Path:
    # a hard link appears with its content and fails if the name exists (also on NFS): no half-written lock is seen
    for _ in range(2):
        try:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise
            except OSError:  # a file system without hard links: exclusive create, then write
                with open(path, "x", encoding="utf-8") as f:
                    f.write(tmp.read_text(encoding="utf-8"))
        except FileExistsError:
            holder = _held_by_other(path)
            if holder is not None:
                raise _refuse(path, holder) from None
            old = _read(path)
            if old and int(old.get("pid", -1)) != os.getpid():
                print(f"warning: {path}: taking over the lock of pid {old.get('pid')} on {old.get('host')} "
                      f"(that process is gone)", file=sys.stderr, flush=True)
            path.unlink(missing_ok=True)
            continue
        _held.add(path)
        atexit.register(release_run_lock, path)
        return path
    raise _refuse(path, _read(path))


def release_run_lock(path: Path) -> None:
    """Remove the lock if this process still holds it."""
    holder = _read(path)
    if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        Path(path).unlink(missing_ok=True)


def release_held_locks() -> None:
    """Release every lock this process took: its run is over (done, refused or stopped), even if the interpreter
    goes on (a recipe's main() called in-process)."""
    while _held:
        release_run_lock(_held.pop())
