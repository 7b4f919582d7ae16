"""Functions run in spawned processes by the store tests (a module of its own: a spawned child imports it)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from postquant.store.table import ResultTable


def append_rows(path: str, worker: int, n: int, barrier: Any) -> None:
    """Put `n` rows ``w<worker>-<i>`` into the table at `path`, one write each, once every worker is ready."""
    table = ResultTable(Path(path))
    barrier.wait(timeout=60)
    for i in range(n):
        table.put(f"w{worker}-{i:03d}", {"worker": worker, "i": i})


def work_through(path: str, worker: int, keys: list[str], barrier: Any, did: Any) -> None:
    """Do the keys of `keys` that are left (`ResultTable.todo`), telling `did` each key this process did."""
    table = ResultTable(Path(path))
    barrier.wait(timeout=60)
    for key in table.todo(keys):
        time.sleep(0.02)  # a row takes a while: the other process looks for work meanwhile
        did.put((worker, key))
        table.put(key, {"worker": worker})
