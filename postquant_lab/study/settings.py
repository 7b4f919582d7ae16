"""The study's base settings: per model the reduced cost of learned rounding, the bits of `study all`,
and the "other dataset" each model can be calibrated on."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from postquant.errors import RecipeError
from postquant.store.files import fingerprint
from postquant_lab.zoo import CIFAR10_PREPROCESS, ImagePreprocess, efficientnet_lite_preprocess

# The study base per model: the `learned` default with its cost cut to fit ~1-3 min a run on one thread.
# Measured on resnet20-cifar10 W4A4, 1 thread, on the shared 2-core CPU with two other jobs running:
# evaluation of the 10k test images 13-15 s; quantize 21 s at 50 iters and 43-65 s at 100 iters (256
# calibration samples), i.e. ~1-1.5 min a run at the chosen 100 iters. The other models' settings scale
# this down by their size and are not measured yet.
DEFAULT_BASE: dict[str, dict[str, Any]] = {
    "resnet20-cifar10": {"iters": 100, "calib_size": 256, "limit": None, "seeds": 3},
    "resnet56-cifar10": {"iters": 50, "calib_size": 256, "limit": None, "seeds": 3},
    # Lite0 and MiniLM cost 3-10x a resnet20 run: two seeds (the fewest that give a spread) by default.
    "efficientnet-lite0": {"iters": 20, "calib_size": 64, "limit": 400, "seeds": 2},
    "minilm-l6": {"iters": 50, "calib_size": 256, "limit": None, "seeds": 2},
}
FALLBACK_BASE: dict[str, Any] = {"iters": 50, "calib_size": 256, "limit": None, "seeds": 3}
DIGEST_LENGTH = (
    12  # hex digits of the base digest and of a run hash (`fingerprint`): part of every cached key
)

# The bits of `study all` (the list).
DEFAULT_BITS: dict[str, list[str]] = {
    "resnet20-cifar10": ["W4A4", "W2A4"],
    "efficientnet-lite0": ["W4A8"],
    "minilm-l6": ["W4", "W3"],
}


# Models whose inputs are token ids: image-only variants (augmentation, synthetic images) do not apply.
TEXT_MODELS: frozenset[str] = frozenset({"minilm-l6"})


@dataclass(frozen=True)
class OtherCalib:
    """Another dataset to calibrate a model on: a path under the shared folder and how to preprocess it."""

    parts: tuple[str, ...]
    description: str
    preprocess: ImagePreprocess | None = None  # None: the model's own (text models)


# "calib_data='other'": ImageNet images shrunk to 32x32 for the CIFAR ResNets, CIFAR images blown up to
# 224x224 for EfficientNet, ImageNet class names as sentences for MiniLM.
OTHER_CALIB: dict[str, OtherCalib] = {
    "resnet20-cifar10": OtherCalib(
        ("data", "imagenet", "calib1000"),
        "ImageNet calib1000 resized to 32x32",
        ImagePreprocess(CIFAR10_PREPROCESS.normalize, size=32, crop_fraction=1.0),
    ),
    "resnet56-cifar10": OtherCalib(
        ("data", "imagenet", "calib1000"),
        "ImageNet calib1000 resized to 32x32",
        ImagePreprocess(CIFAR10_PREPROCESS.normalize, size=32, crop_fraction=1.0),
    ),
    "efficientnet-lite0": OtherCalib(
        ("data", "cifar10", "calib1000.npz"),
        "CIFAR-10 calib1000 resized to 224x224",
        efficientnet_lite_preprocess(),
    ),
    "minilm-l6": OtherCalib(
        ("data", "imagenet", "synset_words.txt"), "ImageNet class names (synset_words.txt)"
    ),
}


def parse_bits(text: str) -> tuple[int, int | None]:
    """``'W4A4'`` -> ``(4, 4)``; ``'W3'`` -> ``(3, None)``.

    Raises:
        RecipeError: not of the form ``W<bits>`` or ``W<bits>A<bits>``.
    """
    match = re.fullmatch(r"W(\d)(?:A(\d))?", text.strip().upper())
    if match is None:
        raise RecipeError(
            f"bits {text!r} must look like 'W4A4' (weights and activations) or 'W3' (weights only)"
        )
    w, a = match.groups()
    return int(w), (int(a) if a else None)


@dataclass(frozen=True)
class StudySettings:
    """What every run of a study shares: model, bits and the reduced cost of the learned-rounding base.

    Attributes:
        model: zoo name.
        bits: ``'W4A4'`` or ``'W3'``.
        iters: optimisation steps per reconstruction unit.
        calib_size: calibration samples.
        limit: evaluation samples (spread over the set); ``None`` = the full evaluation set.
        seeds: runs per variant (seeds 0..seeds-1); not part of `digest`, so more seeds add to the cache.
    """

    model: str
    bits: str
    iters: int
    calib_size: int
    limit: int | None = None
    seeds: int = 3

    def base_recipe(self) -> dict[str, Any]:
        """The study base: the `learned` preset at these bits, with `iters` and `calib_size`."""
        w_bits, a_bits = parse_bits(self.bits)
        return {
            "method": "learned",
            "w_bits": w_bits,
            "a_bits": a_bits,
            "calib_size": self.calib_size,
            "learned": {"iters": self.iters, "progress": False},
        }

    def digest(self) -> str:
        """A short hash of the base settings: results of other settings are never mixed in."""
        return fingerprint(
            {"base": self.base_recipe(), "limit": self.limit, "model": self.model}, DIGEST_LENGTH
        )

    def header(self) -> str:
        """One line for table headers."""
        evaluated = "full evaluation set" if self.limit is None else f"{self.limit} evaluation samples"
        return (
            f"{self.model} {self.bits}: method 'learned' (SQuant start, block reconstruction, QDrop 0.5), "
            f"{self.iters} iters/unit, {self.calib_size} calibration samples, min/max activation ranges, {evaluated}"
        )


def default_settings(
    model: str,
    bits: str,
    iters: int | None = None,
    calib_size: int | None = None,
    limit: int | None = None,
    seeds: int | None = None,
) -> StudySettings:
    """`StudySettings` with the model's defaults (`DEFAULT_BASE`) where an argument is ``None``."""
    parse_bits(bits)
    base = DEFAULT_BASE.get(model, FALLBACK_BASE)
    return StudySettings(
        model,
        bits.upper(),
        iters if iters is not None else base["iters"],
        calib_size if calib_size is not None else base["calib_size"],
        limit if limit is not None else base["limit"],
        seeds if seeds is not None else base["seeds"],
    )
