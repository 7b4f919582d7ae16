"""`ResultTable`: rows of results keyed by a string in one JSON file, shared by processes and resumable.

A long job that produces one result per key (a study run, a layer's importance row, a benchmark row) writes
each result as soon as it has it; run again, it skips the keys that already have a row, so an interrupted job
resumes where it stopped. Several processes (one per core) may share the file:

* reading never locks: the file is only ever replaced whole (`postquant.store.files.write_json_atomic`);
* every write takes the table's lock (``<file>.lock``), re-reads the file, merges its rows in and replaces
  the file, so no process loses another's rows;
* claims (``<file>.claims``, `postquant.store.claims.Claims`) split the keys still to do: `todo` yields only
  the keys that no other live process works on.

How the rows sit in the file is a `Layout`: an object ``{key: row}`` (`KeyedRows`, the default), a list of
rows whose key is computed from their fields (`ListedRows`), or ``{**header, "rows": {key: row}}``
(`HeaderedRows`, for a file that belongs to one configuration).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from postquant.errors import DataError, OutputError, PostquantError
from postquant.store.claims import Claims, SharedLock
from postquant.store.files import read_json, write_json_atomic

__all__ = ["HeaderedRows", "KeyedRows", "Layout", "ListedRows", "ResultTable"]

log = logging.getLogger(__name__)


class Layout(Protocol):
    """How a table's rows are laid out in its JSON file."""

    def decode(self, data: Any) -> dict[str, Any]:
        """The rows ``{key: row}`` in the file's JSON `data`; raises ValueError, KeyError or TypeError when
        `data` is not such a file."""
        ...

    def encode(self, rows: dict[str, Any]) -> Any:
        """The JSON data of a file holding `rows`."""
        ...


@dataclass(frozen=True)
class KeyedRows:
    """The file is an object ``{key: row}``."""

    def decode(self, data: Any) -> dict[str, Any]:
        if not isinstance(data, dict):
            raise TypeError(f"a JSON {type(data).__name__}, not an object of rows")
        return dict(data)

    def encode(self, rows: dict[str, Any]) -> Any:
        return rows


@dataclass(frozen=True)
class ListedRows:
    """The file is a list of rows (objects); a row's key is ``key(row)``, computed from its fields."""

    key: Callable[[dict[str, Any]], str]

    def decode(self, data: Any) -> dict[str, Any]:
        if not isinstance(data, list):
            raise TypeError(f"a JSON {type(data).__name__}, not a list of rows")
        return {self.key(row): row for row in data}

    def encode(self, rows: dict[str, Any]) -> Any:
        return list(rows.values())


@dataclass(frozen=True)
class HeaderedRows:
    """The file is ``{**header, "rows": {key: row}}``: the rows of one configuration, named by `header`.

    A file whose header differs belongs to another configuration and is refused.
    """

    header: dict[str, Any] = field(default_factory=dict)

    def decode(self, data: Any) -> dict[str, Any]:
        for name, value in self.header.items():
            if data[name] != value:
                raise ValueError(f"it holds {name} {data[name]!r}")
        rows = data["rows"]
        if not isinstance(rows, dict):
            raise TypeError(f"its rows are a JSON {type(rows).__name__}, not an object")
        return dict(rows)

    def encode(self, rows: dict[str, Any]) -> Any:
        return {**self.header, "rows": rows}


class ResultTable:
    """Rows of results keyed by a string in one JSON file (see the module docstring).

    Args:
        path: the JSON file (created with its folder on the first write).
        layout: how the rows sit in the file (default `KeyedRows`: an object ``{key: row}``).
        merge: ``merge(stored, new)``, the row kept when a key already has one (default: the new row).
        indent, sort_keys, newline: how the JSON is written (`json.dumps`; `newline` ends the file with one).
        lock_path: the lock file (default ``<path>.lock``).
        claims_path: the claims file (default ``<path>.claims``).
        what: what the file is, for error messages ("importance table").
        damaged_hint: what to do about a file that cannot be read ("delete it to measure again").
        writable_hint: what to do about a file that cannot be written ("choose a writable --out").
        damaged_error: the error raised for a file that cannot be read.

    Raises:
        PostquantError: (`damaged_error`) the file exists but does not hold such a table.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        layout: Layout | None = None,
        merge: Callable[[Any, Any], Any] | None = None,
        indent: int | None = 1,
        sort_keys: bool = False,
        newline: bool = False,
        lock_path: Path | None = None,
        claims_path: Path | None = None,
        what: str = "results table",
        damaged_hint: str = "move it away to start again",
        writable_hint: str = "choose a writable directory",
        damaged_error: type[PostquantError] = DataError,
    ) -> None:
        self.path = Path(path).expanduser()
        self.layout: Layout = layout if layout is not None else KeyedRows()
        self.merge = merge
        self._json = {"indent": indent, "sort_keys": sort_keys, "newline": newline}
        self.lock = SharedLock(lock_path or self.path.with_name(self.path.name + ".lock"))
        self.claims = Claims(claims_path or self.path.with_name(self.path.name + ".claims"), self.lock)
        self.what, self.damaged_hint, self.writable_hint = what, damaged_hint, writable_hint
        self.damaged_error = damaged_error
        self.rows: dict[str, Any] = {}
        self.refresh()

    # ------------------------------------------------------------------------------------------ reading

    def refresh(self) -> None:
        """Merge in the rows other processes have written since this table last read the file."""
        merged = self._read()
        for key, row in self.rows.items():
            merged[key] = self._merged(merged[key], row) if key in merged else row
        self.rows = merged

    def __contains__(self, key: object) -> bool:
        return key in self.rows

    def __len__(self) -> int:
        return len(self.rows)

    def get(self, key: str, default: Any = None) -> Any:
        """The row of `key` as of the last read, or `default`."""
        return self.rows.get(key, default)

    def missing(self, keys: Iterable[str]) -> list[str]:
        """The `keys` without a row as of the last read (in order, each once): what is left to do."""
        return [key for key in dict.fromkeys(keys) if key not in self.rows]

    # ------------------------------------------------------------------------------------------ writing

    def put(self, key: str, row: Any) -> None:
        """Store the row of `key` and rewrite the file (`put_many`)."""
        self.put_many({key: row})

    def put_many(self, rows: dict[str, Any]) -> None:
        """Store `rows` and rewrite the file atomically under the lock, with every other process's rows."""
        with self.locked():
            self.refresh()
            for key, row in rows.items():
                self.rows[key] = self._merged(self.rows[key], row) if key in self.rows else row
            write_json_atomic(self.path, self.layout.encode(self.rows), **self._json)  # type: ignore[arg-type]

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the table's lock for the ``with`` block (re-entrant: `put` and `claim` may run inside).

        Raises:
            OutputError: the lock or the table cannot be written.
        """
        try:
            with self.lock.held():
                yield
        except OutputError:  # an OSError too: raised by a nested block, already clear
            raise
        except OSError as exc:
            raise OutputError(
                f"cannot write {self.path}: {exc.strerror or exc}; {self.writable_hint}"
            ) from exc

    # ------------------------------------------------------------------------------------------ claims

    def claim(self, key: str) -> bool:
        """Claim `key` for this process; False when it has a row (written by any process) or another live
        process works on it (a claim of a process that died is taken over)."""
        with self.locked():
            self.refresh()
            return key not in self.rows and self.claims.take(key)

    def release(self, keys: Iterable[str] | None = None) -> None:
        """Drop this process's claims on `keys` (every claim of this process when None)."""
        with self.locked():
            self.claims.release(keys)

    def todo(self, keys: Iterable[str]) -> Iterator[str]:
        """Each of `keys` that has no row and that no other live process works on, claimed for this process
        until the caller asks for the next one (`put` its row before that).

        Run again, the loop skips what is done; processes running the same loop split the keys.
        """
        for key in self.missing(keys):
            if not self.claim(key):
                log.info("%s: %s is done or being done by another process", self.path.name, key)
                continue
            try:
                yield key
            finally:
                self.release([key])

    # ------------------------------------------------------------------------------------------ helpers

    def _merged(self, stored: Any, new: Any) -> Any:
        return new if self.merge is None else self.merge(stored, new)

    def _read(self) -> dict[str, Any]:
        try:
            data = read_json(self.path)
            return {} if data is None else self.layout.decode(data)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise self.damaged_error(
                f"{self.path} is not a readable {self.what} ({exc}); {self.damaged_hint}"
            ) from exc
