"""Resuming an importance measurement: the cost table saved layer by layer in ``mixed.checkpoint_dir``.

Measuring ``loss`` importance is one forward pass of the calibration subset per layer and bit width (a
quarter of an hour on EfficientNet-Lite0 on a CPU). With a checkpoint directory, every finished layer's row
``{bits: cost}`` is written at once to ``importance_<key>.json``, so an interrupted measurement resumes at
the next layer, and quantizing again (another budget, another bit allocation, a recipe that differs only in
what comes after the allocation, e.g. its learned rounding) reuses the table instead of measuring again.

Several processes measuring the same table at the same time (e.g. two seeds of one study run, one per core)
split it: each claims a layer before measuring it (``importance_<key>.claims``, under a lock), skips the
layers others have claimed or finished, and waits at the end for the ones still being measured elsewhere. A
claim left by a process that died is taken over (`postquant.store.table`).

The key is a hash of everything a cost depends on: the measure, the float model's weights and buffers, the
calibration samples, the dequantized weight ``Q_b(W)`` of every scored layer at every bit width (so the grid,
its exponent search and the rounding method are covered without naming recipe fields), and the seed of the
gradient measures. Costs are stored as JSON floats, which read back bit-exactly: a resumed measurement gives
the same table, hence the same allocation, as an uninterrupted one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from postquant.errors import CheckpointError
from postquant.store.files import fingerprint
from postquant.store.table import HeaderedRows, ResultTable

__all__ = ["WAIT", "ImportanceCache"]

log = logging.getLogger(__name__)

CostRow = dict[int, float]  # bits -> cost of one layer
WAIT = "<wait>"  # `next_layer`: every layer left is being measured by another process


class ImportanceCache:
    """The rows ``layer -> {bits: cost}`` measured so far for one key, in ``root/importance_<key>.json``.

    On disk ``{"key": key, "rows": {layer: {"<bits>": cost}}}``, a `ResultTable` whose rows widen: a layer
    measured again at other bit widths keeps the costs it had.
    """

    def __init__(self, root: str | Path, parts: dict[str, Any], poll_seconds: float = 2.0) -> None:
        self.key = fingerprint(parts)
        path = Path(root).expanduser() / f"importance_{self.key}.json"
        self.table = ResultTable(
            path,
            layout=HeaderedRows({"key": self.key}),
            merge=lambda stored, new: {**stored, **new},
            sort_keys=True,
            lock_path=path.with_suffix(".lock"),
            claims_path=path.with_suffix(".claims"),
            what="importance table",
            damaged_hint="delete it to measure again",
            writable_hint="choose a writable mixed.checkpoint_dir",
            damaged_error=CheckpointError,
        )
        self.path, self.claims_path = path, self.table.claims.path
        self.poll_seconds = poll_seconds
        self.rows: dict[str, CostRow] = self._costs()
        if self.rows:
            log.info("importance: %d layers already measured in %s", len(self.rows), self.path)

    def row(self, name: str, bit_choices: Iterable[int]) -> CostRow | None:
        """The saved row of layer `name` restricted to `bit_choices`, or None when any of them is missing."""
        saved = self.rows.get(name, {})
        bits = list(bit_choices)
        return {b: saved[b] for b in bits} if all(b in saved for b in bits) else None

    def next_layer(self, layers: Iterable[str], bit_choices: Iterable[int]) -> str | None:
        """Claim the first of `layers` that nobody has measured or is measuring, and return its name.

        Returns `WAIT` when the only layers left are being measured by other live processes, None when every
        layer has its row.
        """
        bits = list(bit_choices)
        waiting = False
        with self.table.locked():
            self._refresh()
            for name in layers:
                if self.row(name, bits) is not None:
                    continue
                if self.table.claims.take(name):
                    return name
                waiting = True
        return WAIT if waiting else None

    def wait(self) -> None:
        """Sleep while other processes measure (between `next_layer` calls that returned `WAIT`)."""
        time.sleep(self.poll_seconds)

    def record(self, rows: dict[str, CostRow]) -> None:
        """Add (or widen) the rows of some layers, write the table and drop this process's claims on them."""
        with self.table.locked():
            self.table.put_many({name: {str(b): c for b, c in row.items()} for name, row in rows.items()})
            self.rows = self._costs()
            self.table.claims.release(rows)

    def release(self) -> None:
        """Drop every claim of this process (the measurement ended, finished or not)."""
        self.table.release()

    def _refresh(self) -> None:
        """Merge in the rows other processes have written since this cache last read the file."""
        self.table.refresh()
        self.rows = self._costs()

    def _costs(self) -> dict[str, CostRow]:
        """The table's rows as costs, checked."""
        try:
            rows = {
                str(name): {int(b): float(c) for b, c in row.items()} for name, row in self.table.rows.items()
            }
        except (ValueError, TypeError, AttributeError) as exc:
            raise CheckpointError(
                f"{self.path} is not a readable importance table ({exc}); delete it to measure again"
            ) from exc
        bad = [name for name, row in rows.items() if any(not c >= 0.0 for c in row.values())]
        if bad:
            raise CheckpointError(
                f"{self.path} holds negative or NaN costs (layers {bad[:3]}); delete it to measure again"
            )
        return rows
