"""Per-weight input second moments: the diagonal of a layer's output-error Hessian, from calibration data.

For ``y = W x`` the output error of a weight change ``dW`` is ``E||dW x||^2 = sum_o dW_o H dW_o^T`` with
``H = E[x x^T]``. Keeping the diagonal, the error is ``sum dW_ij^2 E[x_j^2]``: a weight matters in
proportion to the energy of the input it multiplies. For a convolution, weight ``(o, c, kh, kw)``
multiplies input channel ``c`` of its group at every position, so its factor is that channel's mean
``x_c^2`` over samples and positions (padding aside).

`input_moments` measures these factors for chosen layers in one pass over the calibration batches and
returns them shaped to broadcast against each layer's weight, ready for an error-weighted grid search
(`postquant.grids.fit_power_grid(importance=...)`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from postquant.calib.act_ranges import input_hooks
from postquant.calib.data import forward_all
from postquant.errors import DataError


def _channel_energy(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum of ``x^2`` per input channel (features) of one batch, and the number of positions summed."""
    x = x.detach().double()
    if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d):
        channels = x.shape[1]
        per_channel = x.transpose(0, 1).reshape(channels, -1)  # (C, N*spatial)
        return per_channel.pow(2).sum(1), per_channel.shape[1]
    flat = x.reshape(-1, x.shape[-1])  # Linear: (tokens, features)
    return flat.pow(2).sum(0), flat.shape[0]


def weight_factors(module: nn.Module, channel_moment: torch.Tensor) -> torch.Tensor:
    """Per-input-channel moments (C,) arranged to broadcast against ``module.weight``.

    Linear ``(out, in)`` -> ``(1, in)``; a convolution with ``groups`` -> ``(out, in/groups, 1, ...)``,
    where output channel ``o`` reads the input channels of its group ``o // (out/groups)``.
    """
    weight = module.weight
    if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d):
        out_ch, per_group = weight.shape[:2]
        groups = module.groups
        by_group = channel_moment.reshape(groups, per_group)  # (groups, in/groups)
        group_of = torch.arange(out_ch, device=by_group.device) // (out_ch // groups)  # (out,)
        factors = by_group[group_of]  # (out, in/groups)
        return as_float(factors.reshape(out_ch, per_group, *([1] * (weight.dim() - 2))), weight)
    return as_float(channel_moment.reshape(1, -1), weight)


def as_float(factors: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Factors (accumulated in float64) in float64 for a float64 weight, else float32."""
    return factors if weight.dtype == torch.float64 else factors.float()


@torch.no_grad()
def input_moments(model: nn.Module, layers: Sequence[str], batches: Any) -> dict[str, torch.Tensor]:
    """``E[x_j^2]`` of every input of each layer in `layers`, shaped to broadcast against its weight.

    Args:
        model: the float model (run once per batch, unchanged).
        layers: names of its Conv/Linear layers.
        batches: a non-empty list of calibration batches the model accepts.

    Raises:
        DataError: no batches, or a layer that the batches never reach.
    """
    if not isinstance(batches, list) or not batches:
        raise DataError(
            "input moments need calibration batches (calib=... as tensors or a DataLoader, not a forward "
            "loop); pass calibration data or use power_search: weights"
        )
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = dict.fromkeys(layers, 0)

    def record(name: str, module: nn.Module, x: torch.Tensor) -> None:
        energy, n = _channel_energy(module, x)
        sums[name] = sums[name] + energy if name in sums else energy
        counts[name] += n

    was_training = model.training
    model.eval()
    try:
        with input_hooks({name: model.get_submodule(name) for name in layers}, record):
            forward_all(model, batches)
    finally:
        model.train(was_training)
    unreached = [name for name in layers if counts[name] == 0]
    if unreached:
        raise DataError(
            f"the calibration batches never reach layers {unreached[:5]}: check the model's inputs"
        )
    return {name: weight_factors(model.get_submodule(name), sums[name] / counts[name]) for name in layers}
