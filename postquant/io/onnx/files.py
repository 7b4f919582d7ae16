"""Writing an ONNX model whole: in one file, or with its tensors in a second file (external data).

A protobuf message cannot exceed 2 GB, so a larger model keeps its tensors in ``<name>.onnx.data`` beside
``<name>.onnx`` (ONNX's external data: each initializer names the file, an offset and a length). Either way
the files are written into a temporary directory beside the destination, checked there (onnxruntime reads
external data from the model's folder, so the staged pair runs as it will at the destination), and renamed
into place: the data file first, then the model, so that a reader never sees a half-written file, and
nothing is left behind on an error or Ctrl-C.

onnx is imported inside the functions: it is an optional dependency (``postquant[onnx]``).
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from postquant.errors import OutputError
from postquant.store.files import replace_dir

__all__ = ["EXTERNAL_DATA_BYTES", "StagedOnnx", "check_target", "data_path", "needs_external_data"]

log = logging.getLogger(__name__)

EXTERNAL_DATA_BYTES = 2**31 - 2**28  # tensors above ~1.75 GiB go to a data file (protobuf's limit: 2 GiB)


def data_path(path: Path) -> Path:
    """The external data file of the model at `path`: ``<name>.onnx.data`` beside it."""
    return path.with_name(f"{path.name}.data")


def needs_external_data(model: Any) -> bool:
    """Whether `model`'s initializers come near protobuf's 2 GB limit (`EXTERNAL_DATA_BYTES`)."""
    return sum(t.ByteSize() for t in model.graph.initializer) > EXTERNAL_DATA_BYTES


def check_target(path: Path, *, overwrite: bool, external_data: bool | None) -> None:
    """Raise `OutputError` unless `path` (and its data file, with `external_data`) may be written.

    Without `overwrite` an existing ``.onnx``, or an existing data file when the export writes one, is refused
    (`external_data` None, not decided yet: the ``.onnx`` alone is checked).
    """
    if path.is_dir():
        raise OutputError(f"cannot write the ONNX model to {path}: it is a directory; give a .onnx file path")
    if overwrite:
        return
    taken = [p for p in (path, data_path(path) if external_data else None) if p and p.exists()]
    if taken:
        raise OutputError(
            f"{' and '.join(map(str, taken))} exist{'s' if len(taken) == 1 else ''}; pass overwrite=True "
            "(CLI --overwrite) to replace, or choose another output path"
        )


def _external_locations(path: Path) -> set[str]:
    """The data files the model at `path` refers to (empty when it is not an ONNX model or keeps its tensors)."""
    import onnx  # optional dependency (extra: onnx)

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # not an ONNX model (or unreadable): it refers to no data file of ours
        return set()
    return {
        entry.value
        for tensor in model.graph.initializer
        if tensor.data_location == onnx.TensorProto.EXTERNAL
        for entry in tensor.external_data
        if entry.key == "location"
    }


@dataclass
class StagedOnnx:
    """An ONNX model saved in a temporary directory beside its destination `path`, to check, then `commit`."""

    path: Path  # the destination
    directory: Path  # the temporary directory
    external_data: bool

    @property
    def model(self) -> Path:
        """The staged ``.onnx`` (the destination's name, so that its data file reference is the final one)."""
        return self.directory / self.path.name

    @property
    def files(self) -> list[Path]:
        """The staged files: the model, and its data file with external data."""
        return [self.model, *([self.directory / data_path(self.path).name] if self.external_data else [])]

    @property
    def bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    @classmethod
    def save(cls, model: Any, path: Path, *, external_data: bool) -> StagedOnnx:
        """Write `model` into a new temporary directory beside `path` (its tensors into the data file with
        `external_data`). Raises `OutputError` when it cannot be written; nothing is left behind."""
        import onnx  # optional dependency (extra: onnx)

        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            directory = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
            directory.mkdir()
        except OSError as exc:
            raise OutputError(f"cannot write the ONNX model to {path}: {exc.strerror or exc}") from exc
        staged = cls(path, directory, external_data)
        try:
            onnx.save_model(
                model,
                str(staged.model),
                save_as_external_data=external_data,
                all_tensors_to_one_file=True,
                location=data_path(path).name,
                size_threshold=0,  # every initializer: the .onnx holds the graph alone
            )
        except OSError as exc:
            staged.discard()
            raise OutputError(f"cannot write the ONNX model to {path}: {exc.strerror or exc}") from exc
        except BaseException:
            staged.discard()
            raise
        staged.external_data = (directory / data_path(path).name).exists()  # False: a graph without tensors
        return staged

    def discard(self) -> None:
        """Remove the temporary directory."""
        shutil.rmtree(self.directory, ignore_errors=True)

    def reject(self) -> Path:
        """Keep the staged model beside `path` for inspection: ``<stem>.rejected.onnx``, or with external
        data the directory ``<stem>.rejected`` holding the pair. Returns where."""
        if not self.external_data:
            rejected = self.path.with_name(f"{self.path.stem}.rejected{self.path.suffix}")
            os.replace(self.model, rejected)
            self.discard()
            return rejected
        rejected = self.path.with_name(f"{self.path.stem}.rejected")
        replace_dir(self.directory, rejected)
        return rejected

    def commit(self, *, overwrite: bool) -> None:
        """Rename the staged files to `path` (and its data file): the data first, then the model. A data file
        that the replaced model referred to and the new one does not is removed."""
        try:  # again: a file may have appeared since the export began
            check_target(self.path, overwrite=overwrite, external_data=self.external_data)
        except OutputError:
            self.discard()
            raise
        data = data_path(self.path)
        stale = (
            data.name in _external_locations(self.path) and not self.external_data
            if self.path.exists()
            else False
        )
        try:
            if self.external_data:
                os.replace(self.directory / data.name, data)
            os.replace(self.model, self.path)
        except OSError as exc:
            self.discard()
            raise OutputError(f"cannot write the ONNX model to {self.path}: {exc.strerror or exc}") from exc
        self.discard()
        if stale:
            log.info("removed %s, the data file of the replaced model", data)
            data.unlink(missing_ok=True)
