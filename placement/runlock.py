"""The lock of a run folder: `run.lock` names the process writing the folder (pid, host, its start time), so a second
command never replaces or continues a run that is still going. A lock whose process is gone (a kill) is stale and
is taken over; a lock from another host cannot be checked and counts as held."""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from .errors import PlacementError

LOCK_FILE = "run.lock"


def _start_ticks(pid: int) -> int | None:
    """When a process started (Linux clock ticks since boot): tells a live run from a later process with its pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def read_lock(root: Path) -> dict | None:
    """The lock's record if `root/run.lock` is a lock of ours (None for no lock, or anyone else's file)."""
    path = root / LOCK_FILE
    if path.is_symlink() or not path.is_file():
        return None
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return info if isinstance(info, dict) and info.get("tool") == "placement" else None


def alive(info: dict) -> bool:
    if info.get("host") != socket.gethostname():
        return True  # another machine's process cannot be checked from here
    pid = info.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's live process
    started, now = info.get("ticks"), _start_ticks(pid)
    return started is None or now is None or started == now


def refuse_if_held(root: Path, out) -> None:
    info = read_lock(root)
    if info is not None and alive(info):
        raise PlacementError(f"--out {out} is being written by a running placement (pid {info.get('pid')} on "
                             f"{info.get('host')}): wait for it to finish or pass another --out (if that process "
                             f"is gone, delete {root / LOCK_FILE})")


def acquire(root: Path, out) -> dict:
    """Take the folder's lock (after `refuse_if_held`): created exclusively, so of two commands claiming the same
    folder at once one is refused; a stale lock of ours is replaced."""
    info = {"tool": "placement", "pid": os.getpid(), "host": socket.gethostname(), "ticks": _start_ticks(os.getpid()),
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    path = root / LOCK_FILE
    if read_lock(root) is not None:
        refuse_if_held(root, out)
        os.unlink(path)  # stale: its process is gone
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError as err:
        raise PlacementError(f"--out {out} holds a {LOCK_FILE} placement did not write, or another placement "
                             "claimed it a moment ago: pass another --out") from err
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(info) + "\n")
    return info


def release(root: Path, info: dict) -> None:
    """Remove the lock if it is still this process's own."""
    current = read_lock(root)
    if current is not None and current.get("pid") == info["pid"] and current.get("host") == info["host"]:
        os.unlink(root / LOCK_FILE)
