"""Writing files so that a reader never sees half of one: the one home of atomic writes (no torch import)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["write_atomic", "write_text_atomic"]


def write_atomic(path: Path, write: Callable[[str], Any]) -> None:
    """``write(tmp)`` into a temporary file beside `path`, then rename it over `path` (never half written).

    The temporary file is removed on any error, Ctrl-C included, and the error is raised as it came.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """`text` written to `path` atomically (`write_atomic`)."""
    write_atomic(path, lambda tmp: Path(tmp).write_text(text))
