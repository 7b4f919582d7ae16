"""`ZooModel`: a float model together with its task, example inputs, default data and preprocessing."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from postquant.errors import DataError
from postquant_lab.zoo.datasets import (
    EvalData,
    Preprocess,
    calibration_inputs,
    missing_data_error,
    open_eval_data,
)

__all__ = ["Task", "ZooModel"]

Task = Literal["classification", "sts", "lm"]


@dataclass
class ZooModel:
    """A float model ready to quantize and evaluate.

    Attributes:
        name: zoo name, e.g. ``"resnet20-cifar10"``.
        model: the float model, in eval mode, on the CPU.
        task: ``"classification"`` (logits, top-1/top-5) or ``"sts"`` (mean-pooled sentence embeddings, Spearman).
        input_shape: one sample's shape for image models, e.g. ``(3, 32, 32)``; ``None`` for text.
        example_inputs: a small batch the model can be called with: a (N,C,H,W) tensor, or a tokenizer dict
            for text models (call ``model(**example_inputs)``).
        eval_data: the default evaluation set (may not exist on this machine).
        calib_data: the default calibration set (may not exist on this machine).
        preprocess: how files are turned into model inputs; ``None`` when unknown (custom models).
        tokenizer: the tokenizer of a causal LM (task ``"lm"``: text windows, perplexity), else ``None``.
        seqlen: tokens per window of a causal LM's evaluation (calibration windows: `calib_seqlen`).
    """

    name: str
    model: nn.Module
    task: Task
    input_shape: tuple[int, ...] | None
    example_inputs: Any
    eval_data: Path | None
    calib_data: Path | None
    preprocess: Preprocess | None = None
    tokenizer: Any = None
    seqlen: int = 512
    calib_seqlen: int = 256

    def __repr__(self) -> str:  # the generated repr would print the whole model and input tensors
        params = sum(p.numel() for p in self.model.parameters())
        return (
            f"ZooModel(name={self.name!r}, model={type(self.model).__name__} ({params / 1e6:.2f} M params), "
            f"task={self.task!r}, input_shape={self.input_shape}, eval_data={self.eval_data}, "
            f"calib_data={self.calib_data})"
        )

    def _resolve(self, path: str | Path | None, default: Path | None, what: str) -> tuple[Path, Preprocess]:
        if self.preprocess is None:
            raise DataError(
                f"model {self.name!r} has no preprocessing, so postquant cannot read data files for it. "
                "Have its factory return a ZooModel with preprocess=ImagePreprocess(...) or TextPreprocess(...)."
            )
        if path is None:
            if default is None:
                raise DataError(f"model {self.name!r} has no default {what} set; pass a path (--data PATH).")
            path = default
        path = Path(path).expanduser()
        if not path.exists():
            raise missing_data_error(path, f"{self.name} {what} data")
        return path, self.preprocess

    def eval_batches(
        self, path: str | Path | None = None, limit: int | None = None, batch_size: int = 128
    ) -> EvalData:
        """Labelled evaluation batches, decoded lazily.

        Args:
            path: the data (default `eval_data`).
            limit: number of samples, spread evenly over the set; ``None`` = all.
            batch_size: samples per batch.

        Raises:
            DataError: missing path (says how to set ``POSTQUANT_SHARED`` or pass ``--data``) or wrong layout.
        """
        path, pre = self._resolve(path, self.eval_data, "evaluation")
        return open_eval_data(path, pre, limit, batch_size)

    def calib_batches(
        self, path: str | Path | None = None, limit: int | None = None, batch_size: int = 32
    ) -> list[Any]:
        """Calibration batches in memory: model inputs (tensors or tokenizer dicts), no labels.

        Args:
            path: the data (default `calib_data`).
            limit: number of samples (sentences for text models), spread evenly over the set; ``None`` = all.
            batch_size: samples per batch.

        Raises:
            DataError: missing path or wrong layout.
        """
        if self.task == "lm":  # `limit` random windows of `calib_seqlen` tokens (seed 0), as (B, L) token ids
            windows = self.text_windows(path, evaluation=False, n=limit if limit is not None else 128)
            return list(windows.split(batch_size))
        path, pre = self._resolve(path, self.calib_data, "calibration")
        return calibration_inputs(path, pre, limit, batch_size)

    def text_windows(
        self, path: str | Path | None, *, evaluation: bool, n: int | None, seed: int = 0
    ) -> torch.Tensor:
        """Token windows of a causal LM's text (default: its eval/calib file): the first `n` non-overlapping
        windows of `seqlen` tokens (evaluation), or `n` seeded random windows of `calib_seqlen` tokens.

        Raises:
            DataError: no tokenizer, a missing file, text shorter than one window, a window beyond the context.
        """
        from postquant.calib.text import check_seqlen, eval_windows, random_windows, tokenize_file

        if self.tokenizer is None:
            raise DataError(f"model {self.name!r} has no tokenizer: text windows need one")
        seqlen = self.seqlen if evaluation else self.calib_seqlen
        check_seqlen(self.model, seqlen)
        chosen = path if path is not None else (self.eval_data if evaluation else self.calib_data)
        if chosen is None:
            raise DataError(f"model {self.name!r} has no default text; pass a file")
        tokens = tokenize_file(chosen, self.tokenizer)
        if evaluation:
            return eval_windows(tokens, seqlen, n)
        return random_windows(tokens, n if n is not None else 128, seqlen, seed)
