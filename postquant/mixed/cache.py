"""Resuming an importance measurement: the cost table saved layer by layer in ``mixed.checkpoint_dir``.

Measuring ``loss`` importance is one forward pass of the calibration subset per layer and bit width (a
quarter of an hour on EfficientNet-Lite0 on a CPU). With a checkpoint directory, every finished layer's row
``{bits: cost}`` is written at once to ``importance_<key>.json``, so an interrupted measurement resumes at
the next layer, and quantizing again (another budget, another bit allocation, a recipe that differs only in
what comes after the allocation, e.g. its learned rounding) reuses the table instead of measuring again.

The key is a hash of everything a cost depends on: the measure, the float model's weights and buffers, the
calibration samples, the dequantized weight ``Q_b(W)`` of every scored layer at every bit width (so the grid,
its exponent search and the rounding method are covered without naming recipe fields), and the seed of the
gradient measures. Costs are stored as JSON floats, which read back bit-exactly: a resumed measurement gives
the same table, hence the same allocation, as an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from postquant.errors import CheckpointError, OutputError
from postquant.reconstruct.checkpoint import run_key, write_atomic

__all__ = ["ImportanceCache"]

log = logging.getLogger(__name__)

CostRow = dict[int, float]  # bits -> cost of one layer


class ImportanceCache:
    """The rows ``layer -> {bits: cost}`` measured so far for one key, in ``root/importance_<key>.json``."""

    def __init__(self, root: str | Path, parts: dict[str, Any]) -> None:
        self.key = run_key(parts)
        self.path = Path(root).expanduser() / f"importance_{self.key}.json"
        self.rows: dict[str, CostRow] = self._read()
        if self.rows:
            log.info("importance: %d layers already measured in %s", len(self.rows), self.path)

    def row(self, name: str, bit_choices: Iterable[int]) -> CostRow | None:
        """The saved row of layer `name` restricted to `bit_choices`, or None when any of them is missing."""
        saved = self.rows.get(name, {})
        bits = list(bit_choices)
        return {b: saved[b] for b in bits} if all(b in saved for b in bits) else None

    def record(self, rows: dict[str, CostRow]) -> None:
        """Add (or widen) the rows of some layers and write the table."""
        for name, row in rows.items():
            self.rows[name] = {**self.rows.get(name, {}), **row}
        data = {
            "key": self.key,
            "rows": {name: {str(b): c for b, c in row.items()} for name, row in self.rows.items()},
        }
        text = json.dumps(data, indent=1, sort_keys=True)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.path, lambda tmp: Path(tmp).write_text(text))
        except OSError as exc:
            raise OutputError(
                f"cannot write {self.path}: {exc.strerror or exc}; choose a writable mixed.checkpoint_dir"
            ) from exc

    def _read(self) -> dict[str, CostRow]:
        if not self.path.is_file():
            return {}
        try:
            data = json.loads(self.path.read_text())
            rows = {
                str(name): {int(b): float(c) for b, c in row.items()} for name, row in data["rows"].items()
            }
            if data["key"] != self.key:
                raise ValueError(f"it holds key {data['key']!r}")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(
                f"{self.path} is not a readable importance table ({exc}); delete it to measure again"
            ) from exc
        bad = [name for name, row in rows.items() if any(not c >= 0.0 for c in row.values())]
        if bad:
            raise CheckpointError(
                f"{self.path} holds negative or NaN costs (layers {bad[:3]}); delete it to measure again"
            )
        return rows
