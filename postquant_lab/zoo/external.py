"""Models from outside the zoo: ``module.path:factory[@weights]`` and ``timm:`` / ``torchvision:`` / ``hf:`` names."""

from __future__ import annotations

import functools
import importlib
import logging
import os
from pathlib import Path

import torch
from torch import nn

from postquant.errors import CheckpointError, UnknownNameError, UnsupportedModelError
from postquant.paths import shared_path
from postquant_lab.zoo.builtin import example_images, hf_sentence_encoder
from postquant_lab.zoo.checkpoint import CHECKPOINT_SUFFIXES, load_weights
from postquant_lab.zoo.datasets import imagenet_preprocess
from postquant_lab.zoo.zoo_model import ZooModel

__all__ = [
    "HUB_PREFIXES",
    "checkpoint_without_architecture",
    "is_checkpoint_path",
    "load_factory",
    "load_hub_model",
]

log = logging.getLogger(__name__)

HUB_PREFIXES = ("timm", "torchvision", "hf", "gguf")
FACTORY_FORM = "'module.path:factory' or 'module.path:factory@/path/to/weights.pt'"


def _no_weights(name: str, err: BaseException) -> CheckpointError:
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return CheckpointError(
        f"could not download weights for {name} ({reason[:200]}): this machine has no internet, or the name is "
        f"wrong; pass a local checkpoint with {FACTORY_FORM}."
    )


def checkpoint_without_architecture(name: str) -> CheckpointError:
    """The error for a bare checkpoint path: weights alone do not say which model to build."""
    exists = "" if Path(name).expanduser().exists() else " (and that file does not exist)"
    return CheckpointError(
        f"{name!r} is a checkpoint file{exists}; a state dict holds weights but not the architecture. "
        f"Pass {FACTORY_FORM} where factory() builds the nn.Module, e.g. 'mypkg.models:build@{name}'."
    )


def load_factory(spec: str) -> ZooModel:
    """Build a model from ``module.path:factory[@weights]``.

    ``factory()`` is imported and called with no arguments. It returns an ``nn.Module`` (task classification,
    ``input_shape`` from its ``input_shape`` attribute if any, no preprocessing) or a full `ZooModel`. The weights,
    if given, are loaded strictly with ``weights_only=True`` (``module.`` prefixes stripped).

    Raises:
        UnknownNameError: malformed spec, module not importable, no such factory.
        UnsupportedModelError: importing the module or calling the factory raised, or the factory returned
            something else than an ``nn.Module`` or ``ZooModel``.
        CheckpointError: unreadable weights, or weights that do not fit.
    """
    target, at, weights = spec.partition("@")
    module_name, _, attr = target.partition(":")
    if not module_name or not attr or (at and not weights):
        raise UnknownNameError(f"cannot read model spec {spec!r}; expected {FACTORY_FORM}.")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise UnknownNameError(
            f"cannot import module {module_name!r} for model {spec!r} ({err}). Is it installed or on PYTHONPATH?"
        ) from err
    except Exception as err:  # the module's own code failed while importing
        raise UnsupportedModelError(
            f"importing module {module_name!r} for model {spec!r} raised {type(err).__name__}: "
            f"{str(err)[:300]} (--verbose shows its traceback)"
        ) from err
    try:
        factory = functools.reduce(getattr, attr.split("."), module)
    except AttributeError as err:
        raise UnknownNameError(f"module {module_name!r} has no attribute {attr!r} (model {spec!r}).") from err
    if not callable(factory):
        raise UnknownNameError(f"{module_name}:{attr} is a {type(factory).__name__}, not a callable factory.")
    try:
        built = factory()
    except Exception as err:  # the user's factory failed: say so in one line, keep its traceback as the cause
        raise UnsupportedModelError(
            f"the model factory {module_name}:{attr}() raised {type(err).__name__}: {str(err)[:300]} "
            "(--verbose shows its traceback)"
        ) from err
    if isinstance(built, ZooModel):
        zoo = built
    elif isinstance(built, nn.Module):
        shape = getattr(built, "input_shape", None)
        shape = tuple(shape) if shape is not None else None
        zoo = ZooModel(
            name=spec,
            model=built,
            task="classification",
            input_shape=shape,
            example_inputs=example_images(shape) if shape else None,
            eval_data=None,
            calib_data=None,
        )
    else:
        raise UnsupportedModelError(
            f"{module_name}:{attr}() returned a {type(built).__name__}; expected an nn.Module or a ZooModel."
        )
    if weights:
        load_weights(zoo.model, Path(weights).expanduser())
    zoo.model.cpu().eval()
    return zoo


def _import_optional(module: str, install: str) -> object:
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise CheckpointError(
            f"{module} is not installed: {install} (or pass a local checkpoint with {FACTORY_FORM})."
        ) from err
    except Exception as err:  # e.g. a torchvision build that does not match torch
        raise CheckpointError(
            f"{module} is installed but does not import ({type(err).__name__}: {str(err)[:200]}); install a build "
            f"that matches torch {torch.__version__}, or pass a local checkpoint with {FACTORY_FORM}."
        ) from err


def _imagenet_zoo(name: str, model: nn.Module, size: int, crop: float, mean, std) -> ZooModel:
    return ZooModel(
        name=name,
        model=model.cpu().eval(),
        task="classification",
        input_shape=(3, size, size),
        example_inputs=example_images((3, size, size)),
        eval_data=shared_path("data", "imagenet", "val1300"),
        calib_data=shared_path("data", "imagenet", "calib1000"),
        preprocess=imagenet_preprocess(size, crop, tuple(mean), tuple(std)),
    )


def _timm(arch: str) -> ZooModel:
    timm = _import_optional("timm", "pip install timm")
    name = f"timm:{arch}"
    try:
        model = timm.create_model(arch, pretrained=True)  # type: ignore[attr-defined]
    except Exception as err:
        raise _no_weights(name, err) from err
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    size = int(cfg.get("input_size", (3, 224, 224))[-1])
    return _imagenet_zoo(
        name, model, size, float(cfg.get("crop_pct", 0.875)),
        cfg.get("mean", (0.485, 0.456, 0.406)), cfg.get("std", (0.229, 0.224, 0.225)),
    )  # fmt: skip


def _torchvision(arch: str) -> ZooModel:
    tv = _import_optional("torchvision", "pip install torchvision")
    name = f"torchvision:{arch}"
    try:
        model = tv.models.get_model(arch, weights="DEFAULT")  # type: ignore[attr-defined]
    except Exception as err:
        raise _no_weights(name, err) from err
    return _imagenet_zoo(name, model, 224, 0.875, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _hf(model_id: str) -> ZooModel:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is first imported
    _import_optional("transformers", "pip install transformers")
    return hf_sentence_encoder(model_id, f"hf:{model_id}")


def _gguf(path: str) -> ZooModel:
    from postquant_lab.zoo.causal_lm import causal_lm_from_gguf

    return causal_lm_from_gguf(path, f"gguf:{path}")


_HUB_LOADERS = {"timm": _timm, "torchvision": _torchvision, "hf": _hf, "gguf": _gguf}


def load_hub_model(name: str) -> ZooModel:
    """Load ``timm:<arch>``, ``torchvision:<arch>`` (ImageNet classifiers), ``hf:<id or folder>`` (STS encoder) or
    ``gguf:<file>`` (a causal LM and its tokenizer, dequantized to float32).

    Pretrained weights need the library and, unless cached, the internet; failures raise a `CheckpointError`
    that says what to install or to pass a local ``module:factory@weights`` instead.
    """
    prefix, _, rest = name.partition(":")
    if prefix not in _HUB_LOADERS or not rest:
        raise UnknownNameError(
            f"cannot read model name {name!r}; expected one of {', '.join(HUB_PREFIXES)}:<name>."
        )
    return _HUB_LOADERS[prefix](rest)


def is_checkpoint_path(name: str) -> bool:
    """True when ``name`` looks like a bare weights file (no ``module:factory``)."""
    return ":" not in name and (
        Path(name).suffix.lower() in CHECKPOINT_SUFFIXES or Path(name).expanduser().is_file()
    )
