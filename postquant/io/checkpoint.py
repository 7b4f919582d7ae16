"""Save and load quantized models: packed integer codes in safetensors plus a JSON manifest.

A checkpoint is a directory with two files:

* ``model.safetensors``: per quantized layer ``<name>``: ``<name>.codes`` (densely packed, `pack_codes`),
  ``<name>.grid.inv_scale`` and ``<name>.grid.zero_point`` (the grid, shape (G, 1); a power grid adds
  ``<name>.grid.max_abs`` (G, 1) and ``<name>.grid.exponent`` (1, 1)), the float tensors of the
  float module under their usual names (``<name>.bias``...) and ``<name>.act.scale`` /
  ``<name>.act.zero_point`` for an input quantizer; per quantized embedding table (recipe ``embeddings``) its
  ``<name>.codes`` and ``<name>.grid.*`` likewise; then every other parameter and buffer of the model
  (BatchNorms that were not folded, float embeddings, norms...), each stored once.
* ``manifest.json`` (`postquant.io.manifest.Manifest`): format and library versions, the model name (so ``load(dir)`` can rebuild a zoo model),
  the recipe, per quantized layer its weight shape, bits, grid config, packed length and input quantizer (and
  the same per quantized embedding table),
  an architecture fingerprint of the float model after BatchNorm folding (modules, parameter shapes, the
  modules that became ``nn.Identity``) and the sha256 of ``model.safetensors``.

Loading takes the original float model (or builds it from the zoo), redoes the same structure (the same
modules replaced by ``nn.Identity``, the same layers wrapped in `QuantizedLayer`) and loads the tensors, so
the loaded model computes bit-identical outputs.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from postquant import __version__
from postquant.choices import ActRanges
from postquant.errors import CheckpointError, OutputError, PostquantError, RecipeError
from postquant.grids import GridConfig, grid_from_state
from postquant.io.manifest import (
    FORMAT_VERSION,
    ActEntry,
    Architecture,
    LayerEntry,
    Manifest,
    ResidualEntry,
    first_error,
)
from postquant.io.pack import unpack_codes
from postquant.model import (
    dynamic_input_layers,
    quantized_embeddings,
    quantized_layers,
    replace_module,
    set_module,
)
from postquant.model.convert import replace_layers
from postquant.nn import ActQuantizer, DynamicActQuantizer, QuantizedEmbedding, QuantizedLayer
from postquant.nn.layer import compact_grid_tensor
from postquant.nn.residual import POINTS_NAME, ResidualQuant, install_points, residual_points
from postquant.outcome import QuantizationResult, attach_result, find_result
from postquant.plan import LayerPlan, Plan
from postquant.recipe import Recipe
from postquant.store.files import file_sha256, write_dir_atomic

__all__ = [
    "FORMAT_VERSION",
    "build_quantized_layer",
    "check_save_target",
    "checkpoint_size",
    "float_size",
    "load",
    "save",
    "saved_model_name",
]

log = logging.getLogger(__name__)

TENSORS_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"
_CODES, _GRID, _ACT = "codes", "grid.", "act."
_PACKED = "packed"  # the layer's buffer of packed codes, saved as ``<name>.codes``


# ----------------------------------------------------------------------------------------------- helpers


def checkpoint_size(directory: str | Path) -> int:
    """Bytes on disk of a checkpoint directory (all its files)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    return sum(p.stat().st_size for p in directory.iterdir() if p.is_file())


def float_size(model: nn.Module) -> int:
    """Bytes of a model's parameters and buffers in memory (shared tensors counted once).

    For a float32 model this is its FP32 size, the reference for compression ratios.
    """
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def _quantized(model: nn.Module) -> dict[str, QuantizedLayer | QuantizedEmbedding]:
    """The quantized layers and quantized embedding tables of `model`, by name."""
    return {**quantized_layers(model), **quantized_embeddings(model)}


def _split_key(key: str, layers: list[str]) -> tuple[str | None, str]:
    """(quantized layer name, rest) of a state-dict key in float naming, or (None, key)."""
    for name in layers:
        if key.startswith(name + "."):
            return name, key[len(name) + 1 :]
    return None, key


def _shared_layers(model: nn.Module) -> dict[str, str]:
    """``{other name: first name}`` of every `QuantizedLayer` registered under more than one name."""
    first: dict[int, str] = {}
    shared: dict[str, str] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, QuantizedLayer | QuantizedEmbedding):
            shared.update({name: first[id(m)]} if id(m) in first else {})
            first.setdefault(id(m), name)
    return shared


def _under(key: str, names: dict[str, str]) -> bool:
    return any(key.startswith(name + ".") for name in names)


def _architecture(model: nn.Module, shared: dict[str, str] | None = None) -> Architecture:
    """Fingerprint of the float structure: modules, parameter/buffer shapes, ``nn.Identity`` modules.

    A quantized model is described as the float model it came from (after BatchNorm folding): a
    `QuantizedLayer` counts as its float module, with a ``weight`` of the codes' shape.
    """
    modules: list[tuple[str, str]] = []
    skip: tuple[str, ...] = (f"{POINTS_NAME}.",)  # the points of integer residuals: the manifest's `residual`
    for name, m in model.named_modules():
        if name == POINTS_NAME or name.startswith(skip):
            continue
        if isinstance(m, QuantizedLayer):
            skip = (*skip, name + ".")
            modules += [
                (f"{name}.{sub}" if sub else name, type(s).__name__) for sub, s in m.inner.named_modules()
            ]
        elif isinstance(m, QuantizedEmbedding):
            modules.append((name, m.float_type))
        else:
            modules.append((name, type(m).__name__))
    by_class: dict[str, list[str]] = {}
    for name, cls in modules:
        by_class.setdefault(cls, []).append(name)
    shapes = {key: list(t.shape) for key, t in _float_state(model, shared or {}).items()}
    return Architecture(modules=by_class, tensors=shapes, identity=by_class.get("Identity", []))


def _float_state(model: nn.Module, shared: dict[str, str]) -> dict[str, torch.Tensor]:
    """The state dict in float naming: a quantized layer's tensors as its float module's (weight = a meta
    tensor of the codes' shape: only shapes are read).

    The tensors of a layer's `shared` other names are left out: they are those of its first name.
    """
    qlayers = _quantized(model)
    out: dict[str, torch.Tensor] = {}
    for key, t in model.state_dict().items():
        if _under(key, shared) or key.startswith(f"{POINTS_NAME}."):
            continue
        name, rest = _split_key(key, list(qlayers))
        if name is None:
            out[key] = t
        elif rest == _PACKED:
            out[f"{name}.weight"] = torch.empty(qlayers[name].weight_shape, dtype=torch.int8, device="meta")
        elif rest.startswith("inner."):
            out[f"{name}.{rest.removeprefix('inner.')}"] = t
    return out


# ------------------------------------------------------------------------------------------------- save


def _layer_entry(layer: QuantizedLayer | QuantizedEmbedding) -> LayerEntry:
    act = layer.act_quant
    return LayerEntry(
        weight_shape=list(layer.weight_shape),
        bits=layer.bits,
        grid=layer.grid_config,
        packed_bytes=layer.packed.numel(),
        act=None if act is None else _act_entry(act),
    )


def _act_entry(q: ActQuantizer | DynamicActQuantizer) -> ActEntry:
    dynamic = isinstance(q, DynamicActQuantizer)
    return ActEntry(bits=q.bits, qmin=q.qmin, qmax=q.qmax, dynamic=dynamic)


def _residual_entry(qmodel: nn.Module) -> ResidualEntry | None:
    points = residual_points(qmodel)
    if points is None:
        return None
    return ResidualEntry(
        outputs={name: _act_entry(q) for name, q in points.output_points().items()},
        pools={str(k): _act_entry(q) for k, q in points.pool_points().items()},
    )


def _empty_quantizer(act: ActEntry) -> ActQuantizer | DynamicActQuantizer:
    """An `ActQuantizer` of a saved integer range (its scale and zero point are loaded after), or the saved
    `DynamicActQuantizer`."""
    q = (
        DynamicActQuantizer(act.bits)
        if act.dynamic
        else ActQuantizer(act.bits, -1.0 if act.qmin < 0 else 0.0, 1.0)
    )
    if (q.qmin, q.qmax) != (act.qmin, act.qmax):
        raise CheckpointError(
            f"activation quantizer range [{act.qmin}, {act.qmax}] is not a {act.bits}-bit range"
        )
    return q


def _saved_key(name: str | None, rest: str) -> str:
    """The safetensors name of a state-dict entry split by `_split_key` (see the module docstring)."""
    if name is None:
        return rest
    for prefix, saved in (("grid_", _GRID), ("act_quant.", _ACT), ("inner.", "")):
        if rest.startswith(prefix):
            return f"{name}.{saved}{rest.removeprefix(prefix)}"
    if rest == _PACKED:
        return f"{name}.{_CODES}"
    raise CheckpointError(f"unexpected tensor {rest!r} in quantized layer {name!r}; cannot save it")


def _tensors_to_save(qmodel: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Safetensors entries and aliases ``{name: stored name}`` of tied tensors (stored once)."""
    qlayers = _quantized(qmodel)
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    stored: dict[tuple[int, int, tuple[int, ...], tuple[int, ...]], str] = {}
    shared = _shared_layers(qmodel)
    for key, t in qmodel.state_dict().items():  # tensors of the live model: storage addresses are stable
        if _under(key, shared):  # a layer used at several places is saved once, under its first name
            continue
        name, rest = _split_key(key, list(qlayers))
        out_key = _saved_key(name, rest)
        if out_key in tensors:
            raise CheckpointError(f"two tensors would be saved as {out_key!r}; rename the module")
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if t.numel() and ident in stored:  # a tied tensor (e.g. shared embeddings)
            aliases[out_key] = stored[ident]
            continue
        stored[ident] = out_key
        t = t.detach().cpu()
        if name is not None and rest.startswith("grid_"):
            tensors[out_key] = compact_grid_tensor(t).contiguous().clone()
        else:
            tensors[out_key] = t.contiguous().clone()
    return tensors, aliases


def _as_float(t: torch.Tensor) -> torch.Tensor:
    """Undo `compact_grid_tensor`: grid tensors are float32 in the grid."""
    return t if t.is_floating_point() else t.to(torch.float32)


def _model_name(qmodel: nn.Module, model_name: str | None) -> str | None:
    if model_name is not None:
        return model_name
    done = find_result(qmodel)
    return done.model_name if done is not None else None


def _recipe_json(qmodel: nn.Module) -> dict[str, Any] | None:
    done = find_result(qmodel)
    return None if done is None or done.recipe is None else done.recipe.model_dump(mode="json")


def _sort_header(path: Path) -> None:
    """Rewrite a safetensors file's JSON header with sorted keys, in place and at the same length.

    safetensors writes its metadata map in a random order: without this, saving the same model twice gives
    different bytes (and a different sha256).
    """
    with path.open("r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) <= size:  # the same entries: the same length (safetensors pads with spaces)
            f.seek(8)
            f.write(text + b" " * (size - len(text)))


def _is_checkpoint(directory: Path) -> bool:
    """Whether `directory` holds exactly a postquant checkpoint: its two files, the manifest written by `save`."""
    contents = {p.name for p in directory.iterdir()}
    if contents != {TENSORS_FILE, MANIFEST_FILE} or not (directory / MANIFEST_FILE).is_file():
        return False
    try:
        manifest = json.loads((directory / MANIFEST_FILE).read_bytes()[: 1 << 26])
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return False
    return isinstance(manifest, dict) and {"format_version", "postquant_version", "sha256"} <= set(manifest)


def check_save_target(directory: Path) -> None:
    """Raise `OutputError` unless `directory` is absent, empty or a postquant checkpoint (replaced by `save`)."""
    if directory.is_symlink() or directory.is_file():
        raise OutputError(f"{directory} exists and is not a directory; choose another checkpoint path")
    if not directory.is_dir() or not any(directory.iterdir()) or _is_checkpoint(directory):
        return
    contents = sorted(p.name for p in directory.iterdir())
    shown = ", ".join(contents[:3]) + (", ..." if len(contents) > 3 else "")
    raise OutputError(
        f"{directory} exists and is not a postquant checkpoint (it holds {shown}); save replaces only a "
        "checkpoint it wrote: choose another path or empty it"
    )


def save(qmodel: nn.Module, directory: str | Path, *, model_name: str | None = None) -> Path:
    """Save a quantized model as packed codes (safetensors) plus a manifest; nothing is left half-written.

    The files are written to a temporary sibling directory, which is then renamed to `directory`. An existing
    checkpoint there is replaced; a directory holding anything else is never touched.

    Args:
        qmodel: a model returned by `postquant.quantize` (or any model holding `QuantizedLayer`s).
        directory: the checkpoint directory to create.
        model_name: the zoo name (or ``module:factory`` spec) of the float model, so that ``load(directory)``
            can rebuild it; defaults to ``postquant.result(qmodel).model_name`` when set.

    Returns:
        The checkpoint directory.

    Raises:
        OutputError: the directory cannot be written, or it exists and is not empty nor a postquant checkpoint.
    """
    directory = Path(directory).expanduser()
    check_save_target(directory)  # before any work; checked again just before the rename
    qlayers = quantized_layers(qmodel)
    if not qlayers:
        log.warning("saving a model without quantized layers: every weight is stored in float")
    tensors, aliases = _tensors_to_save(qmodel)
    shared = _shared_layers(qmodel)
    fields = {
        "format_version": FORMAT_VERSION,
        "postquant_version": __version__,
        "torch_version": torch.__version__,
        "model_name": _model_name(qmodel, model_name),
        "recipe": _recipe_json(qmodel),
        "layers": {name: _layer_entry(layer) for name, layer in qlayers.items()},
        "aliases": aliases,
        "shared": shared,
        "architecture": _architecture(qmodel, shared),
        "residual": _residual_entry(qmodel),
        "embeddings": {name: _layer_entry(table) for name, table in quantized_embeddings(qmodel).items()},
    }

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / TENSORS_FILE), metadata={"format": "postquant", "format_version": "1"})
        _sort_header(tmp / TENSORS_FILE)  # byte-for-byte reproducible files
        manifest = Manifest(**fields, sha256=file_sha256(tmp / TENSORS_FILE))
        (tmp / MANIFEST_FILE).write_text(manifest.to_json())

    try:  # an existing checkpoint is replaced, nothing else is
        write_dir_atomic(directory, write, replaceable=check_save_target)
    except OutputError:
        raise
    except (OSError, SafetensorError) as exc:  # safetensors reports a full disk as a SafetensorError
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise OutputError(
            f"cannot write the checkpoint {directory}: {reason}. Choose a directory whose parent "
            "exists (or can be created) and is writable."
        ) from exc
    log.info(
        "saved %d quantized layers to %s (%d bytes)", len(qlayers), directory, checkpoint_size(directory)
    )
    return directory


# ------------------------------------------------------------------------------------------------- load


def build_quantized_layer(
    layer: nn.Module,
    grid_config: GridConfig,
    grid_tensors: dict[str, torch.Tensor],
    codes: torch.Tensor,
    act: ActEntry | None = None,
    act_tensors: dict[str, torch.Tensor] | None = None,
) -> QuantizedLayer:
    """A `QuantizedLayer` from a float layer, a saved grid, integer codes and a saved input quantizer.

    Args:
        layer: the float Conv/Linear (its weight is dropped; its other tensors are kept).
        grid_config, grid_tensors: as written by `postquant.grids.grid_state`.
        codes: integer codes of the weight's shape.
        act: bits and integer range of the input quantizer (static or dynamic), or None for a float input.
        act_tensors: a static quantizer's ``scale`` and ``zero_point`` (a dynamic one has none).
    """
    act_quant = None
    if act is not None:
        act_quant = _empty_quantizer(act)
        if act_tensors is not None and isinstance(act_quant, ActQuantizer):
            act_quant.scale.copy_(act_tensors["scale"])
            act_quant.zero_point.copy_(act_tensors["zero_point"])
        elif act_tensors:
            raise CheckpointError(
                f"a dynamic input quantizer has no tensors, but {sorted(act_tensors)} are saved"
            )
    try:
        grid = grid_from_state(grid_config, grid_tensors)
    except (RecipeError, ValueError) as exc:  # a missing tensor, a granularity the shapes do not fit
        raise CheckpointError(f"cannot rebuild a saved grid: {exc}") from None
    return QuantizedLayer(layer, grid, codes, act_quant)


def _read_manifest(directory: Path) -> Manifest:
    if not directory.is_dir():
        raise CheckpointError(
            f"checkpoint directory {directory} does not exist; pass the directory given to save()"
        )
    for name in (MANIFEST_FILE, TENSORS_FILE):
        if not (directory / name).is_file():
            raise CheckpointError(
                f"{directory} is not a complete postquant checkpoint: {name} is missing. Save the model again "
                "with postquant.io.save(qmodel, directory)."
            )
    try:
        manifest = json.loads((directory / MANIFEST_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(
            f"{directory / MANIFEST_FILE} is not valid JSON ({exc}); save the model again"
        ) from exc
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{directory} was written in checkpoint format {version!r} (by postquant "
            f"{manifest.get('postquant_version', '?') if isinstance(manifest, dict) else '?'}); this postquant reads "
            f"format {FORMAT_VERSION}. Load it with the postquant version that wrote it, or re-quantize and save."
        )
    missing = [key for key in ("layers", "architecture", "sha256") if key not in manifest]
    if missing:
        raise CheckpointError(f"{directory / MANIFEST_FILE} lacks {', '.join(missing)}; save the model again")
    try:
        return Manifest.model_validate(manifest)
    except ValidationError as exc:
        raise CheckpointError(
            f"the manifest of {directory} is malformed or was edited ({first_error(exc)[:200]}); save the model again"
        ) from None


def _read_tensors(directory: Path, manifest: Manifest) -> dict[str, torch.Tensor]:
    path = directory / TENSORS_FILE
    digest = file_sha256(path)
    if digest != manifest.sha256:
        raise CheckpointError(
            f"{path} is truncated or was modified after saving (sha256 {digest[:12]}... differs from the manifest's "
            f"{manifest.sha256[:12]}...). Copy the checkpoint again or re-save the model."
        )
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} cannot be read as safetensors ({exc}); re-save the model") from exc


def saved_model_name(directory: str | Path) -> str | None:
    """The model name (zoo name or ``module:factory`` spec) a checkpoint's manifest records, if any."""
    return _read_manifest(Path(directory).expanduser()).model_name


def _float_model(manifest: Manifest, model: nn.Module | Callable[[], nn.Module] | None) -> nn.Module:
    if isinstance(model, nn.Module):
        return model
    if callable(model):
        built = model()
        if not isinstance(built, nn.Module):
            raise CheckpointError(
                f"the model factory passed to load returned a {type(built).__name__}, not a torch.nn.Module"
            )
        return built
    name = manifest.model_name
    named = f" (the checkpoint names it {name!r})" if name else ""
    raise CheckpointError(
        f"load needs the float model the checkpoint was saved from{named}: pass load(directory, model) with "
        "the model or a function that builds it; for the zoo's named models, postquant_lab.load(directory) "
        "builds it (the command line does too)"
    )


def _rebuild_structure(model: nn.Module, arch: Architecture) -> None:
    """Redo the structural changes of quantization in place: Identity modules, biases created by folding."""
    names = dict(model.named_modules())
    for name in arch.identity:
        if name in names and not isinstance(names[name], nn.Identity):
            log.debug(
                "replacing %s (%s) with Identity, as in the checkpoint", name, type(names[name]).__name__
            )
            set_module(model, name, nn.Identity())
    state = model.state_dict()
    for key, shape in arch.tensors.items():
        if key in state:
            continue
        owner, _, attr = key.rpartition(".")
        module = model.get_submodule(owner) if owner in dict(model.named_modules()) else None
        if module is not None and attr in module._parameters and module._parameters[attr] is None:
            # e.g. the bias BatchNorm folding gives a conv that had none (in the dtype of its weight)
            weight = getattr(module, "weight", None)
            dtype = weight.dtype if isinstance(weight, torch.Tensor) else torch.get_default_dtype()
            module.register_parameter(attr, nn.Parameter(torch.zeros(shape, dtype=dtype)))


def _check_architecture(
    model: nn.Module, arch: Architecture, model_name: str | None, shared: dict[str, str]
) -> None:
    """Raise a `CheckpointError` naming the first module or tensor that differs from the checkpoint's."""
    here = _architecture(model, shared)
    hint = (
        f"the float model it was saved from ({model_name})"
        if model_name
        else "the float model it was saved from"
    )
    got_modules = {name: cls for cls, names in here.modules.items() for name in names}
    want_modules = {name: cls for cls, names in arch.modules.items() for name in names}
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    for name, cls in sorted(want_modules.items(), key=lambda item: order.get(item[0], len(order))):
        if got_modules.get(name) != cls:
            found = got_modules.get(name)
            what = "is missing" if found is None else f"is a {found}"
            raise CheckpointError(
                f"the model does not match the checkpoint's architecture: layer {name!r} {what} but the "
                f"checkpoint has a {cls}. Load the checkpoint with {hint}."
            )
    for key, shape in arch.tensors.items():
        got = here.tensors.get(key)
        if got != shape:
            layer = key.rpartition(".")[0] or key
            what = "is missing" if got is None else f"has shape {tuple(got)}"
            raise CheckpointError(
                f"the model does not match the checkpoint's architecture: layer {layer!r}: {key} {what} but the "
                f"checkpoint has shape {tuple(shape)}. Load the checkpoint with {hint}."
            )
    extra = [key for key in here.tensors if key not in arch.tensors]
    if extra:
        raise CheckpointError(
            f"the model does not match the checkpoint's architecture: it has {extra[0]!r} (and {len(extra) - 1} more "
            f"tensors) that the checkpoint lacks. Load the checkpoint with {hint}."
        )


def _layer_tensors(tensors: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    prefix = name + "."
    return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}


def _install_layer(
    qmodel: nn.Module, name: str, entry: LayerEntry, own: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Wrap layer `name` of `qmodel` in a `QuantizedLayer` from its saved tensors; return its state dict entries."""
    numel = int(torch.Size(entry.weight_shape).numel())
    packed = own.get(_CODES)
    if packed is None or packed.numel() != entry.packed_bytes:
        raise CheckpointError(f"the packed codes of layer {name!r} are missing or of the wrong length")
    codes = unpack_codes(packed, entry.bits, numel).reshape(entry.weight_shape)
    grid = {k.removeprefix(_GRID): _as_float(v) for k, v in own.items() if k.startswith(_GRID)}
    act = {k.removeprefix(_ACT): v for k, v in own.items() if k.startswith(_ACT)}
    layer = build_quantized_layer(qmodel.get_submodule(name), entry.grid, grid, codes, entry.act, act)
    replace_module(qmodel, name, layer)  # at every place a shared layer is used
    state = {f"{name}.{_PACKED}": packed}
    state |= {f"{name}.grid_{k}": v for k, v in grid.items()}
    state |= {f"{name}.act_quant.{k}": v for k, v in act.items()}
    state |= {
        f"{name}.inner.{k}": v for k, v in own.items() if k != _CODES and not k.startswith((_GRID, _ACT))
    }
    return state


def _install_embedding(
    qmodel: nn.Module, name: str, entry: LayerEntry, own: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Replace embedding `name` of `qmodel` by a `QuantizedEmbedding` from its saved tensors; return its state
    dict entries."""
    table = qmodel.get_submodule(name)
    if not isinstance(table, nn.Embedding) or entry.act is not None or len(entry.weight_shape) != 2:
        raise CheckpointError(
            f"the checkpoint quantizes embedding {name!r}, but the model has a {type(table).__name__} there; "
            "load it with the float model it was saved from"
        )
    packed = own.get(_CODES)
    if packed is None or packed.numel() != entry.packed_bytes:
        raise CheckpointError(f"the packed codes of embedding {name!r} are missing or of the wrong length")
    codes = unpack_codes(packed, entry.bits, int(torch.Size(entry.weight_shape).numel()))
    grid = {k.removeprefix(_GRID): _as_float(v) for k, v in own.items() if k.startswith(_GRID)}
    try:
        qtable = QuantizedEmbedding(
            table, grid_from_state(entry.grid, grid), codes.reshape(entry.weight_shape)
        )
    except (RecipeError, ValueError) as exc:
        raise CheckpointError(f"cannot rebuild the saved grid of embedding {name!r}: {exc}") from None
    replace_module(qmodel, name, qtable)
    return {f"{name}.{_PACKED}": packed} | {f"{name}.grid_{k}": v for k, v in grid.items()}


def _loaded_result(qmodel: nn.Module, manifest: Manifest) -> QuantizationResult:
    """The result a loaded model carries: its saved recipe (a recipe from another postquant version only gets
    a warning), a plan read off its layers, and the model name."""
    recipe = None
    if manifest.recipe is not None:
        try:
            recipe = Recipe.model_validate(manifest.recipe)
        except ValidationError as exc:
            log.warning(
                "the checkpoint's recipe does not validate with this postquant (%s); its result has no recipe",
                str(exc).splitlines()[0],
            )
    plan = Plan(
        LayerPlan(name, layer.bits, layer.act_quant.bits if layer.act_quant is not None else None)
        for name, layer in quantized_layers(qmodel).items()
    )
    dynamic = ActRanges.DYNAMIC if dynamic_input_layers(qmodel) else None  # a static rule is not recorded
    return QuantizationResult(recipe, plan, model_name=manifest.model_name, act_ranges=dynamic)


def load(directory: str | Path, model: nn.Module | Callable[[], nn.Module] | None = None) -> nn.Module:
    """Load a checkpoint written by `save` into a quantized model with bit-identical outputs.

    Loading never runs code that the checkpoint names: the caller gives the float model.

    Args:
        directory: the checkpoint directory.
        model: the original float model (not modified; a copy is quantized), or a function that builds it.
            ``postquant_lab.load(directory)`` builds the zoo model a checkpoint names.

    Returns:
        The quantized model (eval mode); `postquant.result(qmodel)` holds its recipe.

    Raises:
        CheckpointError: missing files, a truncated or modified tensor file, an unknown format version, or a
            model of another architecture (the message names the first differing layer), or no `model`.
    """
    directory = Path(directory).expanduser()
    manifest = _read_manifest(directory)
    tensors = _read_tensors(directory, manifest)
    qmodel = copy.deepcopy(_float_model(manifest, model)).eval()
    try:
        _restore(qmodel, manifest, tensors)
    except PostquantError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:  # a malformed manifest
        detail = f"{type(exc).__name__}: {exc}"
        raise CheckpointError(
            f"the manifest of {directory} is malformed or was edited ({detail[:200]}); save the model again"
        ) from None
    log.info("loaded %d quantized layers from %s", len(manifest.layers), directory)
    return qmodel


def _restore(qmodel: nn.Module, manifest: Manifest, tensors: dict[str, torch.Tensor]) -> None:
    """Turn the float copy `qmodel` into the saved quantized model, in place (`load`'s work)."""
    arch = manifest.architecture
    replace_layers(qmodel)  # as `quantize` did
    _rebuild_structure(qmodel, arch)
    shared = manifest.shared
    _check_architecture(qmodel, arch, manifest.model_name, shared)

    state: dict[str, torch.Tensor] = {}
    layers = manifest.layers
    for name, entry in layers.items():
        state.update(_install_layer(qmodel, name, entry, _layer_tensors(tensors, name)))
    for name, entry in manifest.embeddings.items():
        state.update(_install_embedding(qmodel, name, entry, _layer_tensors(tensors, name)))
    quantized = [*layers, *manifest.embeddings]
    if manifest.residual is not None:
        outputs = {name: _empty_quantizer(act) for name, act in manifest.residual.outputs.items()}
        pools = {int(k): _empty_quantizer(act) for k, act in manifest.residual.pools.items()}
        install_points(qmodel, ResidualQuant(outputs, pools))
    for key, t in tensors.items():
        if _split_key(key, quantized)[0] is None:
            state[key] = t
    for alias, stored in manifest.aliases.items():
        name, rest = _split_key(alias, list(layers))
        state[alias if name is None else f"{name}.inner.{rest}"] = tensors[stored]
    for other, first in shared.items():
        if qmodel.get_submodule(other) is not qmodel.get_submodule(first):
            raise CheckpointError(
                f"layer {other!r} is the same module as {first!r} in the checkpoint but not in the model: load it "
                "with the float model it was saved from"
            )
    for key in qmodel.state_dict():  # a shared layer's tensors under its other names: those of the first
        for other, first in shared.items():
            if key.startswith(other + "."):
                state[key] = state[first + key.removeprefix(other)]
    try:
        qmodel.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"the checkpoint's tensors do not fit the model: {exc}") from exc
    attach_result(qmodel, _loaded_result(qmodel, manifest))
