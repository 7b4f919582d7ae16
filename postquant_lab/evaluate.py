"""`evaluate`: a model's score on a zoo model's evaluation set (top-1/top-5, or STS Spearman); lab code."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from postquant.eval.metrics import pearson, spearman, topk_correct
from postquant.eval.run import eval_mode, run_model
from postquant.progress import progress_bar
from postquant_lab.zoo.datasets import EvalData
from postquant_lab.zoo.zoo_model import ZooModel

__all__ = ["EvalResult", "eval_mode", "evaluate", "mean_pool", "sentence_embeddings"]

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    """One evaluation.

    Attributes:
        metric: ``"top1"`` (classification) or ``"spearman"`` (STS).
        value: the metric in percent (accuracy 0..100, Spearman x100).
        n: number of samples (images or sentence pairs).
        extra: other metrics on the same scale, e.g. ``{"top5": ...}`` or ``{"pearson": ...}``.
    """

    metric: str
    value: float
    n: int
    extra: dict[str, float] = field(default_factory=dict)


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean of the hidden states over the real tokens: ``sum(h * mask) / sum(mask)``.

    Args:
        hidden: (N, T, H) last hidden states.
        attention_mask: (N, T), 1 for tokens and 0 for padding.

    Returns:
        (N, H) sentence vectors.
    """
    mask = attention_mask.unsqueeze(-1).to(hidden.device, hidden.dtype)  # (N, T, 1)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)  # (N, H)


def sentence_embeddings(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """L2-normalised mean-pooled embeddings of a tokenized batch (the sentence-transformers recipe).

    Args:
        model: an encoder returning ``last_hidden_state`` (e.g. ``BertModel``).
        batch: tokenizer outputs with ``attention_mask``.

    Returns:
        (N, H) unit vectors.
    """
    hidden = run_model(model, batch)  # (N, T, H)
    return F.normalize(mean_pool(hidden.float(), batch["attention_mask"]), dim=-1)


# Input elements per forward call. Large image batches thrash the CPU caches: EfficientNet-Lite0 runs about
# 4x faster per image in chunks of ~8 than at 128 (2-core CPU), and 1.3x faster again in chunks of 3 than of 6
# (42 vs 31 images/s, same top-1 and top-5 on 300 images), while 32x32 batches of 128 stay whole.
FORWARD_ELEMENTS = 1 << 19


def _forward_in_chunks(model: nn.Module, inputs: object) -> Tensor:
    """`run_model` on an image batch split into chunks of at most `FORWARD_ELEMENTS` input elements.

    (Channels-last inputs ran EfficientNet-Lite0 ~1.15x faster again, but break models that ``view`` a
    feature map, so inputs keep their memory order.)
    """
    if not isinstance(inputs, Tensor) or inputs.dim() < 2:
        return run_model(model, inputs)
    chunk = max(1, FORWARD_ELEMENTS // max(1, inputs[0].numel()))
    if chunk >= len(inputs):
        return run_model(model, inputs)
    return torch.cat([run_model(model, part) for part in inputs.split(chunk)])


def _classification(model: nn.Module, data: EvalData, bar: tqdm) -> tuple[dict[int, int], int]:
    counts = {1: 0, 5: 0}
    n = 0
    for inputs, labels in data:
        logits = _forward_in_chunks(model, inputs)  # (N, C)
        for k, c in topk_correct(logits, labels, counts).items():
            counts[k] += c
        n += len(labels)
        bar.update(len(labels))
        bar.set_postfix(top1=f"{100.0 * counts[1] / n:.2f}")
    return counts, n


def _sts(model: nn.Module, data: EvalData, bar: tqdm) -> tuple[Tensor, Tensor]:
    cosines, gold = [], []
    for pair, scores in data:
        a = sentence_embeddings(model, pair.first)  # (N, H)
        b = sentence_embeddings(model, pair.second)  # (N, H)
        cosines.append((a * b).sum(dim=-1).double().cpu())  # (N,) cosine similarity of unit vectors
        gold.append(scores.double())
        bar.update(len(scores))
    return torch.cat(cosines), torch.cat(gold)


def evaluate(
    model: nn.Module,
    zoo: ZooModel,
    path: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 128,
    progress: bool = True,
    data: EvalData | None = None,
) -> EvalResult:
    """Score ``model`` (the float ``zoo.model`` or a quantized copy) on ``zoo``'s evaluation data.

    Classification: top-1 (``value``) and top-5 (``extra``) accuracy in percent. STS: Spearman x100 of the
    cosine similarity of mean-pooled, normalised embeddings against the gold scores (``extra``: Pearson x100).
    Large image batches go through the model in chunks of at most `FORWARD_ELEMENTS` input values; the metrics
    do not depend on it unless the model normalises across the batch.

    Args:
        model: the model to score; it runs in eval and inference mode, its training flag is restored after.
        zoo: gives the data, preprocessing and task.
        path: evaluation data (default ``zoo.eval_data``).
        limit: number of samples, spread evenly over the set; ``None`` = all.
        batch_size: samples per batch.
        progress: show a tqdm bar.
        data: already-opened evaluation data (anything iterable like `EvalData`, with ``task``, ``n`` and
            ``path``); overrides `path`, `limit` and `batch_size`. Benchmarks pass decoded data kept in memory.

    Raises:
        DataError: missing or malformed data.
    """
    if zoo.task == "lm" and data is None:
        return _perplexity(model, zoo, path, limit)
    if data is None:
        data = zoo.eval_batches(path, limit=limit, batch_size=batch_size)
    start = time.perf_counter()
    with (
        eval_mode(model),
        progress_bar(enabled=progress, total=data.n, desc=f"eval {zoo.name}", unit="sample") as bar,
    ):
        if data.task == "sts":
            cos, gold = _sts(model, data, bar)
            result = EvalResult(
                "spearman", 100.0 * spearman(cos, gold), len(gold), {"pearson": 100.0 * pearson(cos, gold)}
            )
        else:
            counts, n = _classification(model, data, bar)
            pct = {k: 100.0 * c / n if n else math.nan for k, c in counts.items()}
            result = EvalResult("top1", pct[1], n, {"top5": pct[5]})
    log.info(
        "%s on %s: %s %.2f %s (n=%d, %.1f s)", zoo.name, data.path.name, result.metric, result.value,
        " ".join(f"{k} {v:.2f}" for k, v in result.extra.items()), result.n, time.perf_counter() - start,
    )  # fmt: skip
    return result


def _perplexity(model: nn.Module, zoo: ZooModel, path: str | Path | None, limit: int | None) -> EvalResult:
    """A causal LM's perplexity on non-overlapping windows of `zoo.seqlen` tokens of its evaluation text
    (`limit` windows; default 16, as data/text/README.md); ``n`` is the number of predicted tokens."""
    from postquant.eval.perplexity import perplexity

    windows = zoo.text_windows(path, evaluation=True, n=limit if limit is not None else 16)
    start = time.perf_counter()
    with eval_mode(model):
        ppl = perplexity(model, windows)
    log.info(
        "%s: perplexity %.2f on %d tokens (%.1f s)",
        zoo.name,
        ppl.value,
        ppl.tokens,
        time.perf_counter() - start,
    )
    return EvalResult("perplexity", ppl.value, ppl.tokens, {"nll": ppl.nll})
