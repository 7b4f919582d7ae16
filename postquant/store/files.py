"""Files and directories written whole, file hashes and fingerprints (standard library only, no torch import).

A reader never sees half a file: everything is written to a temporary name beside its destination and renamed
over it (`os.replace`, atomic on one file system), and the temporary is removed on any error, Ctrl-C included.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = [
    "atomic_path",
    "file_sha256",
    "fingerprint",
    "read_json",
    "write_atomic",
    "write_dir_atomic",
    "write_json_atomic",
    "write_text_atomic",
]


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary file beside `path` to write in the ``with`` block; renamed over `path` when the block ends.

    On an error the temporary file is removed (if the block has not moved it elsewhere) and the error is raised
    as it came: `path` keeps its previous content.
    """
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: Path, write: Callable[[str], Any]) -> None:
    """``write(tmp)`` into a temporary file beside `path`, then rename it over `path` (never half written).

    The temporary file is removed on any error, Ctrl-C included, and the error is raised as it came.
    """
    with atomic_path(path) as tmp:
        write(str(tmp))


def write_text_atomic(path: Path, text: str) -> None:
    """`text` written to `path` atomically (`write_atomic`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(
    path: Path,
    data: Any,
    *,
    indent: int | None = 1,
    sort_keys: bool = False,
    separators: tuple[str, str] | None = None,
    default: Callable[[Any], Any] | None = None,
    newline: bool = False,
) -> None:
    """`data` as JSON written to `path` atomically; the options are `json.dumps`'s, `newline` ends the file
    with one."""
    text = json.dumps(data, indent=indent, sort_keys=sort_keys, separators=separators, default=default)
    write_text_atomic(path, text + ("\n" if newline else ""))


def replace_dir(tmp: Path, directory: Path) -> None:
    """Rename the finished directory `tmp` to `directory`: an existing one is moved aside, replaced, and deleted
    once the new one is in place (put back if the rename fails)."""
    old = None
    if directory.exists():
        old = directory.parent / f".{directory.name}.old-{uuid.uuid4().hex[:8]}"
        directory.rename(old)
    try:
        tmp.rename(directory)
    except OSError:
        if old is not None:
            old.rename(directory)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_dir_atomic(
    directory: Path, write: Callable[[Path], Any], *, replaceable: Callable[[Path], None] | None = None
) -> None:
    """``write(tmp)`` fills a temporary directory beside `directory`, which is then renamed to `directory`.

    An existing `directory` is moved aside, replaced, and deleted once the new one is in place (put back if
    the rename fails). Nothing is left behind on an error.

    Args:
        directory: the directory to create or replace.
        write: fills the temporary directory it is given.
        replaceable: called with `directory` just before it is replaced; raises to refuse (e.g. a directory
            holding something other than what this writer writes).

    Raises:
        OSError: the temporary directory cannot be created or `write` fails to write (callers give their
            own message).
    """
    tmp = directory.parent / f".{directory.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        if replaceable is not None:
            replaceable(directory)
        replace_dir(tmp, directory)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def read_json(path: Path) -> Any | None:
    """The JSON in `path`, or None when there is no file (nor its folder).

    Raises:
        json.JSONDecodeError: the file is not JSON.
    """
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError):
        return None


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in blocks of 1 MiB."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(obj: Any, length: int = 16) -> str:
    """A short stable hash of JSON-able `obj`: the first `length` hex digits of the sha256 of its JSON.

    Keys are sorted, so the order in which a mapping was built does not matter; values JSON cannot hold
    (paths, enums) count by their ``str``. Used as the names of caches and the keys of results tables: the
    encoding must never change, or every cached result would be orphaned.
    """
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:length]
