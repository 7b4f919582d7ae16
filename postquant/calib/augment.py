"""Feature augmentation of calibration inputs: flips, shifts (padded crops), noise and mixup.

Augmentation is static: it adds `copies` augmented versions of every calibration batch, so that the
reconstruction can cache unit inputs once. It applies to image batches (N, C, H, W) only. Random draws
come from a seeded CPU generator and are moved to the batch's device (the same augmentations everywhere).
"""

from __future__ import annotations

import enum
from typing import Any

import torch
import torch.nn.functional as F

from postquant.errors import DataError


class Augmentation(enum.StrEnum):
    FLIP = "flip"  # horizontal flip with probability 0.5
    SHIFT = "shift"  # zero-pad by `shift` pixels, random crop back to size (CIFAR-style)
    NOISE = "noise"  # + Gaussian noise of `noise_std` times the batch's standard deviation
    MIXUP = "mixup"  # convex combination with a shuffled sample, lambda ~ Beta(alpha, alpha)


def _flip(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    mask = (torch.rand(x.shape[0], generator=g) < 0.5).to(x.device)  # (N,)
    return torch.where(mask[:, None, None, None], x.flip(-1), x)


def _shift(x: torch.Tensor, g: torch.Generator, shift: int) -> torch.Tensor:
    n, _, h, w = x.shape
    padded = F.pad(x, (shift, shift, shift, shift))  # (N, C, H+2s, W+2s)
    dy = torch.randint(0, 2 * shift + 1, (n,), generator=g).tolist()
    dx = torch.randint(0, 2 * shift + 1, (n,), generator=g).tolist()
    return torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])


def _noise(x: torch.Tensor, g: torch.Generator, std: float) -> torch.Tensor:
    return x + std * x.std() * torch.randn(x.shape, generator=g, dtype=x.dtype).to(x.device)


def _mixup(x: torch.Tensor, g: torch.Generator, alpha: float) -> torch.Tensor:
    n = x.shape[0]
    beta = torch.distributions.Beta(torch.tensor(alpha), torch.tensor(alpha))
    # torch's Beta sampler takes no generator: sample under a forked global RNG seeded from `g`.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
        lam = beta.sample((n,)).to(x.device, x.dtype)  # (N,)
    perm = torch.randperm(n, generator=g).to(x.device)
    lam = lam[:, None, None, None]
    return lam * x + (1 - lam) * x[perm]


def augment_batch(
    x: torch.Tensor,
    kinds: list[Augmentation],
    generator: torch.Generator,
    *,
    shift: int = 4,
    noise_std: float = 0.1,
    mixup_alpha: float = 0.4,
) -> torch.Tensor:
    """One augmented copy of an image batch (N, C, H, W), the augmentations applied in the order given."""
    for kind in kinds:
        kind = Augmentation(kind)
        if kind is Augmentation.FLIP:
            x = _flip(x, generator)
        elif kind is Augmentation.SHIFT:
            x = _shift(x, generator, shift)
        elif kind is Augmentation.NOISE:
            x = _noise(x, generator, noise_std)
        else:
            x = _mixup(x, generator, mixup_alpha)
    return x


def augment_batches(
    batches: list[Any], kinds: list[Augmentation], copies: int = 1, seed: int = 0, **options: Any
) -> list[Any]:
    """The batches followed by `copies` augmented versions of each (seeded).

    Raises:
        DataError: a batch is not an image tensor (N, C, H, W) of floats.
    """
    if not kinds:
        return list(batches)
    generator = torch.Generator().manual_seed(seed)
    out = list(batches)
    for _ in range(copies):
        for i, x in enumerate(batches):
            if not (isinstance(x, torch.Tensor) and x.dim() == 4 and x.is_floating_point()):
                raise DataError(
                    f"feature augmentation needs image batches (N, C, H, W) of floats; calibration batch {i} "
                    f"is a {type(x).__name__}. Remove 'augment' from the learned config for this model."
                )
            out.append(augment_batch(x, kinds, generator, **options))
    return out
