"""Processes sharing work through files: a lock shared by processes, and claims held by live processes.

Used where several processes (one per core) split one job: the study's runs, the layers of one importance
measurement, the rows of a benchmark (all through `postquant.store.table.ResultTable`). A claim says "this
process works on key K"; it names its process by host, pid and start time, so that a claim left by a process
that died (or whose pid was reused) is recognised and taken over. A claim from another host cannot be checked
and is honoured.

The lock is `filelock.FileLock` (``flock`` on POSIX, ``LockFileEx`` on Windows), released by the operating
system when its process dies; process liveness is `psutil`'s, so both work on Linux, macOS and Windows.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
from filelock import FileLock

from postquant.store.files import read_json, write_json_atomic

__all__ = ["Claims", "Holder", "SharedLock", "alive", "held_by_another", "process_start", "this_process"]

log = logging.getLogger(__name__)

Holder = dict[str, Any]  # {"host", "pid", "start"}: the process holding a claim


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (Linux; None if gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_start(pid: int) -> str | None:
    """When process `pid` started, to tell it from a later process given the same pid (None if unknown).

    Clock ticks since boot on Linux (``/proc/<pid>/stat``, immune to clock changes); elsewhere the creation
    time `psutil` reports.
    """
    if sys.platform.startswith("linux"):
        stat = _proc_stat(pid)
        return stat[19] if stat is not None and len(stat) > 19 else None
    try:
        return repr(psutil.Process(pid).create_time())
    except (psutil.Error, OverflowError, ValueError):
        return None


def this_process() -> Holder:
    """This process as a claim holder."""
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "start": process_start(pid)}


def alive(holder: Holder) -> bool:
    """Whether the claiming process still runs: a process that has exited (a zombie not yet reaped by its
    parent included) or whose pid now belongs to a later process is dead. A claim from another host cannot be
    checked: it is honoured (delete the claims file if that host's process is gone)."""
    if holder.get("host") != socket.gethostname():
        return True
    try:
        pid = int(holder.get("pid", -1))
        if pid <= 0 or not psutil.pid_exists(pid):
            return False
        if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            return False
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        pass  # alive, owned by another user
    except (OverflowError, ValueError, TypeError):
        return False
    start = process_start(pid)
    return start is None or holder.get("start") in (None, start)


def held_by_another(holder: Holder | None) -> bool:
    """Whether a claim is held by a live process other than this one."""
    return holder is not None and holder != this_process() and alive(holder)


class SharedLock:
    """An exclusive lock on a file, shared by the processes that use it and re-entrant within one.

    The lock file and its folder are created on first use. Used as a context manager.

    Raises:
        OSError: the lock file cannot be created (callers turn it into their own error).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = FileLock(str(path))

    @contextmanager
    def held(self) -> Iterator[None]:
        """Hold the lock for the ``with`` block (nested blocks in one process do not wait for themselves)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            yield


class Claims:
    """Which process works on which key: ``{key: holder}`` in one JSON file, changed only under `lock`.

    Args:
        path: the claims file (created on the first claim).
        lock: the lock that guards it (the lock of the results the claims are about, so that "not finished
            and not claimed" is checked and the claim written in one step).
    """

    def __init__(self, path: Path, lock: SharedLock) -> None:
        self.path = path
        self.lock = lock

    def holders(self) -> dict[str, Holder]:
        """The claims as last written (read without the lock: the file is replaced atomically)."""
        try:
            claims = read_json(self.path)
        except json.JSONDecodeError:  # written atomically, so only a hand edit gets here: start afresh
            log.warning("%s is not valid JSON; ignoring the claims in it", self.path)
            return {}
        return claims if isinstance(claims, dict) else {}

    def take(self, key: str) -> bool:
        """Claim `key` for this process; False when another live process holds it (a dead one's is taken)."""
        with self.lock.held():
            claims = self.holders()
            if held_by_another(claims.get(key)):
                return False
            claims[key] = this_process()
            write_json_atomic(self.path, claims)
        return True

    def release(self, keys: Iterable[str] | None = None) -> None:
        """Drop this process's claims on `keys` (all of them when None); others' claims are kept."""
        wanted = None if keys is None else set(keys)
        with self.lock.held():
            claims = self.holders()
            me = this_process()
            mine = [k for k, holder in claims.items() if holder == me and (wanted is None or k in wanted)]
            if mine:
                write_json_atomic(self.path, {k: h for k, h in claims.items() if k not in mine})

    def held_elsewhere(self, key: str) -> bool:
        """Whether another live process has claimed `key`."""
        return held_by_another(self.holders().get(key))
