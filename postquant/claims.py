"""Processes sharing work through files: an exclusive lock, atomic JSON rewrites, and claims by live processes.

Used where several processes (one per core) split one job: the study's runs (`postquant_lab.study.runner`) and the
layers of one importance measurement (`postquant.mixed.cache`). A claim names its process by host, pid and
start time, so a claim left by a process that died (or whose pid was reused) is recognised and taken over.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from postquant.files import write_text_atomic

__all__ = ["alive", "held_by_another", "locked", "process_start", "read_json", "replace_json", "this_process"]

Holder = dict[str, Any]  # {"host", "pid", "start"}


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (Linux; None elsewhere or if gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_start(pid: int) -> str | None:
    """The start time of process `pid` in clock ticks since boot (Linux), to tell it from a reused pid."""
    stat = _proc_stat(pid)
    return stat[19] if stat is not None and len(stat) > 19 else None


def this_process() -> Holder:
    """This process as a claim holder."""
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "start": process_start(pid)}


def alive(holder: Holder) -> bool:
    """Whether the claiming process still runs. A claim from another host cannot be checked: it is honoured
    (delete the claims file if that host's process is gone)."""
    if holder.get("host") != socket.gethostname():
        return True
    pid = int(holder.get("pid", -1))
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, owned by another user
    except OverflowError:
        return False
    stat = _proc_stat(pid)
    if stat is not None and stat[0] in ("Z", "X"):  # exited, not yet reaped by its parent
        return False
    start = process_start(pid)
    return start is None or holder.get("start") in (None, start)


def held_by_another(holder: Holder | None) -> bool:
    """Whether a claim is held by a live process other than this one."""
    return holder is not None and holder != this_process() and alive(holder)


@contextmanager
def locked(lock_path: Path) -> Iterator[None]:
    """An exclusive lock on `lock_path` (created with its folder), held for the ``with`` block.

    Raises:
        OSError: the lock file cannot be created (callers turn it into their own error).
    """
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def read_json(path: Path) -> Any | None:
    """The JSON in `path`, or None when there is no file.

    Raises:
        json.JSONDecodeError: the file is not JSON.
    """
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def replace_json(path: Path, data: Any, sort_keys: bool = False) -> None:
    """Rewrite `path` with `data` as JSON atomically (a crash leaves the previous file intact)."""
    text = json.dumps(data, indent=1, sort_keys=sort_keys)
    write_text_atomic(path, text)
