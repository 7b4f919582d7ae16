"""Synthetic calibration data: inputs distilled to match BatchNorm statistics (ZeroQ), or plain noise.

ZeroQ (Cai et al., "ZeroQ: A Novel Zero Shot Quantization Framework", CVPR 2020, eq. 3) starts from Gaussian
noise and minimises, by gradient descent on the input, the distance between the batch statistics of every
BatchNorm's input and the running statistics stored in that BatchNorm:

    L = sum_i ||mu_i(x) - mu_i||_2 + ||sigma_i(x) - sigma_i||_2

This needs the float model *before* BatchNorm folding. Everything is seeded.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator

import torch
from torch import nn

from postquant.errors import DataError
from postquant.eval.run import model_placement
from postquant.progress import progress_bar

log = logging.getLogger(__name__)

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def batchnorms(model: nn.Module) -> list[nn.Module]:
    """The BatchNorm layers with running statistics."""
    return [
        m
        for m in model.modules()
        if isinstance(m, _BN) and m.track_running_stats and m.running_mean is not None
    ]


@contextlib.contextmanager
def _bn_inputs(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect the input of every BatchNorm during a forward pass; the hooks always go away."""
    seen: list[torch.Tensor] = []
    handles = [
        bn.register_forward_pre_hook(lambda _m, args: seen.append(args[0])) for bn in batchnorms(model)
    ]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def bn_statistics_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """ZeroQ's loss: distances of per-channel batch mean/std to each BatchNorm's running statistics.

    Args:
        model: the float model (with its BatchNorm layers, in eval mode).
        x: a batch of inputs.
    """
    bns = batchnorms(model)
    if not bns:
        raise DataError("synthetic BatchNorm-matching data needs a model with BatchNorm layers (none found)")
    with _bn_inputs(model) as seen:
        model(x)
    loss = torch.zeros((), dtype=x.dtype, device=x.device)
    for bn, a in zip(bns, seen, strict=False):
        dims = [d for d in range(a.dim()) if d != 1]
        mean = a.mean(dim=dims)
        std = torch.sqrt(a.var(dim=dims, unbiased=False) + bn.eps)
        loss = (
            loss
            + torch.linalg.vector_norm(mean - bn.running_mean)
            + torch.linalg.vector_norm(std - torch.sqrt(bn.running_var + bn.eps))
        )
    return loss


def distill_bn_data(
    model: nn.Module,
    input_shape: tuple[int, ...],
    n: int,
    *,
    steps: int = 200,
    lr: float = 0.2,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
    dtype: torch.dtype = torch.float32,
) -> list[torch.Tensor]:
    """ZeroQ synthetic data: `n` inputs of `input_shape` (one sample, e.g. (3, 32, 32)) in batches.

    Each batch starts from seeded standard-normal noise and takes `steps` Adam steps on
    `bn_statistics_loss` (a forward and backward pass of the model each: `progress` shows a bar). The model
    is left unchanged (its parameters get no gradient). The inputs are optimised in float32 and given to the
    model (and returned) in `dtype`, the dtype of its inputs, on the model's device (the starting noise is
    drawn on the CPU, so every device starts from the same inputs).

    Returns:
        A list of batches (tensors), at most `batch_size` samples each.
    """
    if not batchnorms(model):
        raise DataError("synthetic BatchNorm-matching data needs a model with BatchNorm layers (none found)")
    generator = torch.Generator().manual_seed(seed)
    device = model_placement(model)[0]
    was_training = model.training
    model.eval()
    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    batches = []
    try:
        for start in range(0, n, batch_size):
            m = min(batch_size, n - start)
            x = torch.randn(m, *input_shape, generator=generator).to(device).requires_grad_(True)
            opt = torch.optim.Adam([x], lr=lr)
            desc = f"synthetic data {start // batch_size + 1}/{math.ceil(n / batch_size)}"
            for _ in progress_bar(range(steps), enabled=progress, desc=desc, unit="step", leave=False):
                opt.zero_grad(set_to_none=True)
                loss = bn_statistics_loss(model, x.to(dtype))
                loss.backward()
                opt.step()
            log.debug(
                "synthetic batch %d: BN-statistics loss %.4g", start // batch_size, float(loss.detach())
            )
            batches.append(x.detach().to(dtype))
    finally:
        for p, r in zip(model.parameters(), requires, strict=True):
            p.requires_grad_(r)
        model.train(was_training)
    return batches


def noise_data(
    input_shape: tuple[int, ...],
    n: int,
    *,
    batch_size: int = 32,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> list[torch.Tensor]:
    """`n` seeded standard-normal inputs of `input_shape`, in batches (drawn in float32, given in `dtype`)."""
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.randn(min(batch_size, n - s), *input_shape, generator=generator).to(dtype)
        for s in range(0, n, batch_size)
    ]
