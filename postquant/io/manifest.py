"""A checkpoint's ``manifest.json`` as typed models: what `postquant.io.save` writes and `load` reads.

The JSON on disk is the models' fields in their order (``model_dump(mode="json")``), compact, so a manifest
written before these models existed reads the same and is written byte for byte the same again.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, model_serializer

from postquant.grids import GridConfig

__all__ = [
    "FORMAT_VERSION",
    "ActEntry",
    "Architecture",
    "LayerEntry",
    "Manifest",
    "ResidualEntry",
    "first_error",
]

FORMAT_VERSION = 1


class _Entry(BaseModel):
    model_config = ConfigDict(frozen=True)


class ActEntry(_Entry):
    """The input quantizer of a layer: its bits and integer range (a static one's scale and zero point are
    tensors). ``dynamic``: a per-token `DynamicActQuantizer` (no tensors; left out of the JSON when False, so
    manifests of static quantizers read and write as before)."""

    bits: int
    qmin: int
    qmax: int
    dynamic: bool = False

    @model_serializer(mode="wrap")
    def _without_static_flag(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        if not self.dynamic:
            data.pop("dynamic", None)
        return data


class LayerEntry(_Entry):
    """One quantized layer: the shape of its weight (of its codes), bits, grid, packed bytes, input quantizer."""

    weight_shape: list[int]
    bits: int
    grid: GridConfig
    packed_bytes: int
    act: ActEntry | None


class ResidualEntry(_Entry):
    """The points of integer residuals (`postquant.nn.residual.ResidualQuant`, recipe ``a_residual``).

    Attributes:
        outputs: layer name -> its output point (quantizing the layer's output where it feeds a residual add).
        pools: global pooling index -> its input point.
    """

    outputs: dict[str, ActEntry]
    pools: dict[str, ActEntry]


class Architecture(_Entry):
    """The float structure after BatchNorm folding, to check that a model fits the checkpoint.

    Attributes:
        modules: module class name -> the modules of that class (a quantized layer counts as its float module).
        tensors: state-dict key in float naming -> shape (a quantized layer's ``weight`` has its codes' shape).
        identity: the modules replaced by ``nn.Identity`` (folded BatchNorms).
    """

    modules: dict[str, list[str]]
    tensors: dict[str, list[int]]
    identity: list[str]


class Manifest(_Entry):
    """Everything of a checkpoint besides its tensors (see `postquant.io.checkpoint`).

    Attributes:
        format_version: the checkpoint format (`FORMAT_VERSION`).
        postquant_version, torch_version: the versions that wrote it.
        model_name: the zoo name or ``module:factory`` spec of the float model, if known.
        recipe: the recipe as JSON; kept as data so that a recipe of another postquant version still loads
            (it is validated, with a warning on failure, when attached to the loaded model).
        layers: quantized layer name -> `LayerEntry`.
        aliases: tensor name -> the name it is stored under (tied tensors, stored once).
        shared: other name -> first name of each quantized layer registered under several names.
        architecture: `Architecture` of the float model.
        sha256: of ``model.safetensors``.
        residual: the points of integer residuals (their scales and zero points are tensors under
            ``postquant_residual.``), or None; left out of the JSON when None, so manifests of models without
            them read and write as before.
        embeddings: quantized embedding table name -> `LayerEntry` (without an input quantizer); left out of
            the JSON when empty, likewise.
    """

    format_version: int = FORMAT_VERSION
    postquant_version: str = "unknown"
    torch_version: str = "unknown"
    model_name: str | None = None
    recipe: dict[str, Any] | None = None
    layers: dict[str, LayerEntry]
    aliases: dict[str, str] = {}
    shared: dict[str, str] = {}
    architecture: Architecture
    sha256: str
    residual: ResidualEntry | None = None
    embeddings: dict[str, LayerEntry] = {}

    @model_serializer(mode="wrap")
    def _without_residual(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        if self.residual is None:
            data.pop("residual", None)
        if not self.embeddings:
            data.pop("embeddings", None)
        return data

    def to_json(self) -> str:
        """The manifest file's text: compact JSON, fields in order, ending with a newline."""
        return json.dumps(self.model_dump(mode="json"), separators=(",", ":")) + "\n"


def first_error(exc: ValidationError) -> str:
    """The first problem pydantic found, as ``field.path: message``."""
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error["loc"])
    message = str(error["msg"]).removeprefix("Value error, ")
    return f"{where}: {message}" if where else message
