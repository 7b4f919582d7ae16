"""Evaluation and calibration data: file readers, the preprocessing of each zoo model, lazy batches.

Three layouts are read (see ``shared/data/README.md``):

* ``.npz`` image arrays: ``x`` uint8 (N,H,W,C) or (N,H,W), ``y`` (N,) integer labels (CIFAR-10, MNIST);
* an image folder: ``labels.csv`` (header ``file,label``) or one subfolder per class (ImageFolder);
* STS-B ``.csv``: tab-separated genre, file, year, id, score, sentence1, sentence2 (+ extra columns).

What a model needs on top (normalisation, crop and resize, tokenizer) is its *preprocess*:
`ImagePreprocess` or `TextPreprocess`. `EvalData` decodes one batch at a time while it is iterated.
"""

from __future__ import annotations

import csv
import logging
import math
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple, Protocol

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from postquant.errors import DataError
from postquant.paths import ENV_VAR, shared_dir

__all__ = [
    "CIFAR10_PREPROCESS",
    "IMAGENET_FOLDER_LAYOUT",
    "MNIST_PREPROCESS",
    "NPZ_LAYOUT",
    "STS_LAYOUT",
    "EvalData",
    "ImagePreprocess",
    "Normalize",
    "Preprocess",
    "SentencePair",
    "TextPreprocess",
    "calibration_inputs",
    "center_crop_resize",
    "efficientnet_lite_preprocess",
    "imagenet_preprocess",
    "missing_data_error",
    "open_eval_data",
    "read_image_folder",
    "read_npz_images",
    "read_sentences",
    "read_sts_pairs",
    "spread_indices",
]

log = logging.getLogger(__name__)

NPZ_LAYOUT = "an .npz file with 'x': uint8 images (N,H,W,C) or (N,H,W) and 'y': (N,) integer labels"
IMAGENET_FOLDER_LAYOUT = (
    "an image folder with labels.csv (header 'file,label', one row per image, label = class index), "
    "or one subfolder per class (sorted subfolder names -> labels 0, 1, ...)"
)
STS_LAYOUT = "a tab-separated STS-B file: genre, file, year, id, score, sentence1, sentence2 (no header)"
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".gif", ".tif", ".tiff"})


# --------------------------------------------------------------------------------------------- preprocessing


@dataclass(frozen=True)
class Normalize:
    """Per-channel ``((x / scale) - mean) / std`` on 0..255 pixels, computed in float32 in that order.

    Args:
        scale: divisor applied first (255 for "ToTensor then normalize", 1 for TF-style ``(x - 127) / 128``).
        mean: one value per channel, after the division.
        std: one value per channel, after the division.
    """

    scale: float
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, x: np.ndarray) -> Tensor:
        """Turn uint8 (N,H,W,C) pixels into a float32 (N,C,H,W) tensor."""
        t = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).float()  # (N, C, H, W)
        if self.scale != 1:
            t = t.div(self.scale)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(1, -1, 1, 1)
        return t.sub(mean).div(std).contiguous()


@dataclass(frozen=True)
class ImagePreprocess:
    """How an image model wants its input.

    Args:
        normalize: pixel normalisation.
        size: output side S. ``None`` keeps the images as stored; otherwise each image is center-cropped to a
            square of side ``round(crop_fraction * min(h, w))`` (top-left ``((w - c) // 2, (h - c) // 2)``)
            and resized to S x S with PIL bicubic (the TF EfficientNet eval transform).
        crop_fraction: ``S / (S + 32)`` for the TF transform.
        channels: 3 (RGB) or 1 (grayscale).
    """

    normalize: Normalize
    size: int | None = None
    crop_fraction: float = 1.0
    channels: int = 3

    def arrays(self, x: np.ndarray) -> Tensor:
        """Preprocess uint8 (N,H,W,C) arrays into a float32 (N,C,H,W) batch."""
        if self.size is not None:
            mode = "RGB" if self.channels == 3 else "L"
            x = np.stack(
                [self.pil_to_array(Image.fromarray(img.squeeze(-1) if mode == "L" else img)) for img in x]
            )
        return self.normalize(x)

    def pil_to_array(self, img: Image.Image) -> np.ndarray:
        """Convert to RGB/L, crop and resize one image; return uint8 (H,W,C)."""
        img = img.convert("RGB" if self.channels == 3 else "L")
        if self.size is not None:
            img = center_crop_resize(img, self.size, self.crop_fraction)
        arr = np.asarray(img, dtype=np.uint8)
        return arr if arr.ndim == 3 else arr[:, :, None]


@dataclass
class TextPreprocess:
    """Tokenisation of a text model: padding to the longest sentence of each batch, truncation at ``max_length``.

    Args:
        tokenizer: a Hugging Face tokenizer.
        max_length: longest token sequence kept.
    """

    tokenizer: Any
    max_length: int = 256

    def __call__(self, sentences: Sequence[str]) -> dict[str, Tensor]:
        """Tokenize a batch of sentences into a plain dict of tensors (``input_ids``, ``attention_mask``, ...)."""
        enc = self.tokenizer(
            list(sentences), max_length=self.max_length, truncation=True, padding=True, return_tensors="pt"
        )
        return dict(enc)


Preprocess = ImagePreprocess | TextPreprocess


def center_crop_resize(img: Image.Image, size: int, crop_fraction: float) -> Image.Image:
    """Center crop of side ``round(crop_fraction * min(h, w))``, then PIL bicubic resize to ``size`` x ``size``."""
    w, h = img.size
    c = round(crop_fraction * min(h, w))
    left, top = (w - c) // 2, (h - c) // 2
    return img.crop((left, top, left + c, top + c)).resize((size, size), Image.Resampling.BICUBIC)


CIFAR10_PREPROCESS = ImagePreprocess(Normalize(255.0, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))
"""akamaster ResNets: ``x/255`` then the ImageNet mean/std (the convention of its ``trainer.py``)."""

MNIST_PREPROCESS = ImagePreprocess(Normalize(255.0, (0.1307,), (0.3081,)), channels=1)
"""MNIST: ``x/255`` then ``(x - 0.1307) / 0.3081``, input (N, 1, 28, 28)."""


def efficientnet_lite_preprocess(size: int = 224) -> ImagePreprocess:
    """TF EfficientNet-Lite eval transform: crop ``S/(S+32)`` of the short side, bicubic to S, ``(x - 127) / 128``."""
    return ImagePreprocess(Normalize(1.0, (127.0,) * 3, (128.0,) * 3), size, size / (size + 32))


def imagenet_preprocess(
    size: int = 224,
    crop_fraction: float = 0.875,
    mean: tuple[float, ...] = (0.485, 0.456, 0.406),
    std: tuple[float, ...] = (0.229, 0.224, 0.225),
) -> ImagePreprocess:
    """torchvision/timm-style ImageNet transform: center crop, bicubic resize, ``x/255`` then mean/std."""
    return ImagePreprocess(Normalize(255.0, mean, std), size, crop_fraction)


# ------------------------------------------------------------------------------------------------- readers


def missing_data_error(path: Path, what: str = "data") -> DataError:
    """The error for a data path that does not exist, with the two ways to fix it."""
    return DataError(
        f"{what} {path} is missing. Pass another path (--data PATH), or set {ENV_VAR} to the folder that "
        f"holds models/ and data/ (now {shared_dir()})."
    )


def _check_exists(path: Path, what: str) -> None:
    if not path.exists():
        raise missing_data_error(path, what)


def read_npz_images(
    path: str | Path, require_labels: bool = True, channels: int | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Read ``x`` (uint8 images) and ``y`` (labels) from an ``.npz`` file.

    Args:
        path: the file.
        require_labels: raise when ``y`` is absent (evaluation); calibration needs only ``x``.
        channels: expected channel count; (N,H,W) arrays get a channel axis of 1.

    Returns:
        ``x`` as uint8 (N,H,W,C) and ``y`` as int64 (N,) or ``None``.

    Raises:
        DataError: missing or unreadable file, missing keys, wrong shapes or dtype, empty arrays.
    """
    path = Path(path)
    _check_exists(path, "image array file")
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = set(npz.files)
            if "x" not in keys or (require_labels and "y" not in keys):
                raise DataError(f"{path} has keys {sorted(keys)}; expected {NPZ_LAYOUT}.")
            x = npz["x"]
            y = npz["y"] if "y" in keys else None
    except DataError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise DataError(f"{path} is not a readable .npz file ({err}); expected {NPZ_LAYOUT}.") from err
    except AttributeError as err:  # np.load returned a plain array (.npy)
        raise DataError(f"{path} holds a single array, not an .npz archive; expected {NPZ_LAYOUT}.") from err
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.dtype != np.uint8 or x.shape[-1] not in (1, 3, 4):
        raise DataError(f"{path}: 'x' is {x.dtype} {x.shape}; expected {NPZ_LAYOUT}.")
    if len(x) == 0:
        raise DataError(f"{path} holds no images; expected {NPZ_LAYOUT}.")
    if channels is not None and x.shape[-1] != channels:
        raise DataError(f"{path}: images have {x.shape[-1]} channels, the model expects {channels}.")
    if y is not None:
        if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"{path}: 'y' is {y.dtype} {y.shape} for {len(x)} images; expected {NPZ_LAYOUT}.")
        y = y.astype(np.int64)
    return x, y


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def read_image_folder(path: str | Path, require_labels: bool = True) -> tuple[list[Path], list[int] | None]:
    """List the images of a folder and their labels.

    ``labels.csv`` (header ``file,label``) wins; otherwise class subfolders in sorted order give labels 0, 1, ...
    Without ``require_labels`` a flat folder of images is accepted too (labels ``None``), for calibration.

    Args:
        path: the folder.
        require_labels: raise when no labels are found.

    Returns:
        Image paths and their integer labels (or ``None``).

    Raises:
        DataError: missing or empty folder, no labels, malformed ``labels.csv``, files listed but absent.
    """
    folder = Path(path)
    _check_exists(folder, "image folder")
    if not folder.is_dir():
        raise DataError(f"{folder} is a file, not a folder; expected {IMAGENET_FOLDER_LAYOUT}.")
    labels_csv = folder / "labels.csv"
    if labels_csv.is_file():
        return _read_labels_csv(labels_csv)
    class_dirs = sorted(p for p in folder.iterdir() if p.is_dir() and _image_files(p))
    if class_dirs:
        files, labels = [], []
        for index, class_dir in enumerate(class_dirs):
            images = _image_files(class_dir)
            files += images
            labels += [index] * len(images)
        log.info("%s: %d images in %d class folders", folder, len(files), len(class_dirs))
        return files, labels
    flat = _image_files(folder)
    if not flat:
        raise DataError(f"folder {folder} has no images; expected {IMAGENET_FOLDER_LAYOUT}.")
    if require_labels:
        raise DataError(
            f"folder {folder} has {len(flat)} images but no labels.csv and no class subfolders; "
            f"expected {IMAGENET_FOLDER_LAYOUT}."
        )
    return flat, None


def _read_labels_csv(labels_csv: Path) -> tuple[list[Path], list[int]]:
    folder = labels_csv.parent
    with labels_csv.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        fields = [name.strip() for name in reader.fieldnames or []]
        if fields[:2] != ["file", "label"]:
            raise DataError(f"{labels_csv} starts with {fields}; expected the header 'file,label'.")
        reader.fieldnames = fields
        files, labels = [], []
        for line, row in enumerate(reader, start=2):
            try:
                labels.append(int(row["label"]))
            except (TypeError, ValueError) as err:
                raise DataError(
                    f"{labels_csv} line {line}: label {row['label']!r} is not an integer."
                ) from err
            files.append(folder / row["file"].strip())
    if not files:
        raise DataError(f"{labels_csv} lists no images; expected {IMAGENET_FOLDER_LAYOUT}.")
    absent = [f.name for f in files if not f.is_file()]
    if absent:
        raise DataError(f"{labels_csv} lists {len(absent)} files missing from {folder}, e.g. {absent[0]}.")
    return files, labels


def read_sts_pairs(path: str | Path) -> tuple[list[str], list[str], np.ndarray]:
    """Read an STS-B file (tab-separated, no quoting): columns 4, 5, 6 are score, sentence 1, sentence 2.

    Returns:
        First sentences, second sentences, gold scores (float64, 0..5).

    Raises:
        DataError: missing file, a row with fewer than 7 columns or a non-numeric score, no rows.
    """
    path = Path(path)
    _check_exists(path, "sentence-pair file")
    if path.is_dir():
        raise DataError(f"{path} is a folder; expected {STS_LAYOUT}.")
    first, second, scores = [], [], []
    with path.open(newline="", encoding="utf-8") as f:
        for line, row in enumerate(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE), start=1):
            if not row:
                continue
            if len(row) < 7:
                raise DataError(f"{path} line {line} has {len(row)} columns; expected {STS_LAYOUT}.")
            try:
                scores.append(float(row[4]))
            except ValueError as err:
                raise DataError(
                    f"{path} line {line}: score {row[4]!r} is not a number; expected {STS_LAYOUT}."
                ) from err
            first.append(row[5])
            second.append(row[6])
    if not scores:
        raise DataError(f"{path} has no sentence pairs; expected {STS_LAYOUT}.")
    return first, second, np.asarray(scores, dtype=np.float64)


def read_sentences(path: str | Path) -> list[str]:
    """Sentences for calibrating a text model: both sentences of each STS-B pair, or the lines of a ``.txt``."""
    path = Path(path)
    if path.suffix.lower() == ".txt":
        _check_exists(path, "sentence file")
        lines = [s.strip() for s in path.read_text(encoding="utf-8").splitlines()]
        sentences = [s for s in lines if s]
        if not sentences:
            raise DataError(f"{path} has no sentences (expected one sentence per line).")
        return sentences
    first, second, _ = read_sts_pairs(path)
    return [s for pair in zip(first, second, strict=True) for s in pair]


# --------------------------------------------------------------------------------------------------- sources


class SentencePair(NamedTuple):
    """The model inputs of a batch of sentence pairs (each a tokenizer dict)."""

    first: dict[str, Tensor]
    second: dict[str, Tensor]


class _Source(Protocol):
    """Random access to samples: ``inputs(idx)`` builds one model input for the samples ``idx``."""

    def __len__(self) -> int: ...
    def inputs(self, idx: np.ndarray) -> Any: ...
    def targets(self, idx: np.ndarray) -> Tensor: ...


@dataclass
class _ArrayImages:
    x: np.ndarray  # uint8 (N, H, W, C)
    y: np.ndarray | None
    pre: ImagePreprocess

    def __len__(self) -> int:
        return len(self.x)

    def inputs(self, idx: np.ndarray) -> Tensor:
        return self.pre.arrays(self.x[idx])

    def targets(self, idx: np.ndarray) -> Tensor:
        assert self.y is not None
        return torch.from_numpy(self.y[idx])


@dataclass
class _ImageFiles:
    files: list[Path]
    labels: list[int] | None
    pre: ImagePreprocess

    def __len__(self) -> int:
        return len(self.files)

    def _decode(self, path: Path) -> np.ndarray:
        try:
            with Image.open(path) as img:
                return self.pre.pil_to_array(img)
        except (OSError, UnidentifiedImageError) as err:
            raise DataError(f"cannot decode image {path} ({err}).") from err

    def inputs(self, idx: np.ndarray) -> Tensor:
        arrays = [self._decode(self.files[i]) for i in idx]
        if len({a.shape for a in arrays}) > 1:
            raise DataError(
                f"images of different sizes in {self.files[idx[0]].parent} and the model does not resize them."
            )
        return self.pre.normalize(np.stack(arrays))

    def targets(self, idx: np.ndarray) -> Tensor:
        assert self.labels is not None
        return torch.tensor([self.labels[i] for i in idx], dtype=torch.int64)


@dataclass
class _SentencePairs:
    first: list[str]
    second: list[str]
    scores: np.ndarray
    pre: TextPreprocess

    def __len__(self) -> int:
        return len(self.scores)

    def inputs(self, idx: np.ndarray) -> SentencePair:
        return SentencePair(self.pre([self.first[i] for i in idx]), self.pre([self.second[i] for i in idx]))

    def targets(self, idx: np.ndarray) -> Tensor:
        return torch.from_numpy(self.scores[idx])


@dataclass
class _Sentences:
    sentences: list[str]
    pre: TextPreprocess

    def __len__(self) -> int:
        return len(self.sentences)

    def inputs(self, idx: np.ndarray) -> dict[str, Tensor]:
        return self.pre([self.sentences[i] for i in idx])

    def targets(self, idx: np.ndarray) -> Tensor:
        raise DataError("sentences for calibration have no targets.")


def _open_source(path: Path, pre: Preprocess, labelled: bool) -> _Source:
    """Pick the reader from the path (folder, .npz, text) and check it suits the preprocess."""
    if not path.exists():
        raise missing_data_error(path, "evaluation data" if labelled else "calibration data")
    if isinstance(pre, TextPreprocess):
        if path.is_dir() or path.suffix.lower() == ".npz":
            raise DataError(f"{path} holds images, but this is a text model; expected {STS_LAYOUT}.")
        if labelled:
            return _SentencePairs(*read_sts_pairs(path), pre)
        return _Sentences(read_sentences(path), pre)
    if path.is_dir():
        files, labels = read_image_folder(path, require_labels=labelled)
        return _ImageFiles(files, labels, pre)
    if path.suffix.lower() == ".npz":
        x, y = read_npz_images(path, require_labels=labelled, channels=pre.channels)
        return _ArrayImages(x, y, pre)
    raise DataError(
        f"{path} is neither an .npz file nor a folder; an image model reads {NPZ_LAYOUT}, or {IMAGENET_FOLDER_LAYOUT}."
    )


def spread_indices(n: int, limit: int | None) -> np.ndarray:
    """``limit`` sample indices spread evenly over ``0..n-1`` (all of them when ``limit`` is None or >= n).

    The data files are sorted by class (CIFAR-10) or genre (STS-B), so the first ``limit`` samples would cover
    only a few classes; every ``n/limit``-th sample covers them all and is still deterministic.
    """
    if limit is not None and limit < 1:
        raise DataError(f"limit must be at least 1, got {limit}.")
    if limit is None or limit >= n:
        return np.arange(n)
    return (np.arange(limit, dtype=np.int64) * n) // limit


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise DataError(f"batch_size must be at least 1, got {batch_size}.")


# ------------------------------------------------------------------------------------------------- batches


@dataclass
class EvalData:
    """A labelled evaluation set, decoded one batch at a time each time it is iterated.

    Iterating yields ``(inputs, targets)``:

    * classification: a float (N,C,H,W) tensor and int64 (N,) labels;
    * sts: a `SentencePair` of tokenizer dicts and float64 (N,) gold scores.

    Attributes:
        path: where the data come from.
        task: ``"classification"`` or ``"sts"``.
        n: number of samples (after ``limit``).
        batch_size: samples per batch (the last batch may be smaller).
    """

    path: Path
    task: Literal["classification", "sts"]
    source: _Source
    indices: np.ndarray
    batch_size: int

    @property
    def n(self) -> int:
        """Number of samples."""
        return len(self.indices)

    def __len__(self) -> int:
        return math.ceil(self.n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Any, Tensor]]:
        for start in range(0, self.n, self.batch_size):
            idx = self.indices[start : start + self.batch_size]
            yield self.source.inputs(idx), self.source.targets(idx)


def open_eval_data(
    path: str | Path, preprocess: Preprocess, limit: int | None = None, batch_size: int = 128
) -> EvalData:
    """Open a labelled evaluation set for a model with the given preprocessing.

    Args:
        path: ``.npz``, image folder, or STS-B ``.csv`` (text models).
        preprocess: the model's `ImagePreprocess` or `TextPreprocess`.
        limit: use this many samples, spread evenly over the set (see `spread_indices`); ``None`` = all.
        batch_size: samples per batch.

    Raises:
        DataError: missing path, wrong layout, or data that do not suit the model.
    """
    _check_batch_size(batch_size)
    path = Path(path).expanduser()
    source = _open_source(path, preprocess, labelled=True)
    task: Literal["classification", "sts"] = (
        "sts" if isinstance(preprocess, TextPreprocess) else "classification"
    )
    data = EvalData(path, task, source, spread_indices(len(source), limit), batch_size)
    log.info("evaluation data %s: %d of %d samples, %d batches", path, data.n, len(source), len(data))
    return data


def calibration_inputs(
    path: str | Path, preprocess: Preprocess, limit: int | None = None, batch_size: int = 32
) -> list[Any]:
    """Load calibration batches (model inputs only, no labels) into memory.

    Args:
        path: ``.npz`` (``x`` only is needed), image folder (labels optional), STS-B ``.csv`` or ``.txt`` with one
            sentence per line (text models: each sentence is one sample).
        preprocess: the model's preprocessing.
        limit: number of samples, spread evenly over the set; ``None`` = all.
        batch_size: samples per batch.

    Returns:
        A list of tensors (images) or tokenizer dicts (text).
    """
    _check_batch_size(batch_size)
    path = Path(path).expanduser()
    source = _open_source(path, preprocess, labelled=False)
    indices = spread_indices(len(source), limit)
    batches = [source.inputs(indices[s : s + batch_size]) for s in range(0, len(indices), batch_size)]
    log.info("calibration data %s: %d samples in %d batches", path, len(indices), len(batches))
    return batches
