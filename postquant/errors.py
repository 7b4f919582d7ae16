"""Typed errors. Every error says what is wrong and what to do about it."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class PostquantError(Exception):
    """Base class of every error postquant raises on purpose."""


class RecipeError(PostquantError, ValueError):
    """A recipe field is missing, out of range or of the wrong type."""


class UnknownNameError(PostquantError, KeyError):
    """An unknown model, method, dataset or axis name (the message suggests close names)."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0]) if self.args else ""


class UnsupportedModelError(PostquantError, ValueError):
    """The model has nothing postquant can quantize, or a layer it cannot handle."""


class NonFiniteWeightError(PostquantError, ValueError):
    """A weight holds NaN or Inf values."""


class DataError(PostquantError, ValueError):
    """Data (evaluation or calibration) is missing, empty, mis-shaped or laid out wrongly."""


class CheckpointError(PostquantError, ValueError):
    """A checkpoint is missing, corrupt, untrusted (not weights-only) or for another architecture."""


class DeviceError(PostquantError, ValueError):
    """A device that is unknown or not available here (e.g. ``cuda`` on a machine without CUDA)."""


class OutputError(PostquantError, OSError):
    """An output path cannot be written."""


class OnnxMismatchError(PostquantError, RuntimeError):
    """An exported ONNX model, run in onnxruntime, does not compute what the PyTorch simulation computes.

    ``metrics`` holds the comparison (``sqnr_db``, ``top1_agreement``, ``max_abs_diff``, ``n``).
    """

    def __init__(self, message: str, metrics: dict[str, float]) -> None:
        super().__init__(message)
        self.metrics = metrics

    def __reduce__(self) -> tuple[type, tuple[str, dict[str, float]]]:  # picklable across processes
        return type(self), (str(self), self.metrics)


def unknown_name(kind: str, name: str, known: Iterable[str]) -> UnknownNameError:
    """Build an `UnknownNameError` for `name`, suggesting the closest of `known`."""
    known = sorted(known)
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return UnknownNameError(f"unknown {kind} {name!r}.{hint} Known: {', '.join(known)}.")


class BudgetError(RecipeError):
    """A mixed-precision budget that no allocation of the allowed bit widths can meet (or that needs none)."""


class ExportError(UnsupportedModelError):
    """A model, or one of its layers, has no form in the export format (the message names the layer and why)."""


class ExportMismatchError(PostquantError, RuntimeError):
    """An exported model, loaded by its real consumer, does not compute what the quantized model computes.

    ``metrics`` holds the comparison (e.g. ``max_abs_diff``, ``rel_max_diff``, ``sqnr_db``, ``top1_agreement``).
    """

    def __init__(self, message: str, metrics: dict[str, float]) -> None:
        super().__init__(message)
        self.metrics = metrics

    def __reduce__(self) -> tuple[type, tuple[str, dict[str, float]]]:  # picklable across processes
        return type(self), (str(self), self.metrics)


class DistributedError(PostquantError, RuntimeError):
    """A collective of a distributed run failed: another rank died, hung past the timeout, or the network
    broke. Every rank stops; no rank writes output."""


class DistributedMismatchError(DistributedError):
    """The ranks of a distributed run were given different inputs (recipe, model weights or calibration data).

    ``what`` names the input, ``ranks`` the ranks whose copy differs from rank 0's.
    """

    def __init__(self, message: str, what: str, ranks: list[int]) -> None:
        super().__init__(message)
        self.what = what
        self.ranks = ranks

    def __reduce__(self) -> tuple[type, tuple[str, str, list[int]]]:  # picklable across processes
        return type(self), (str(self), self.what, self.ranks)
