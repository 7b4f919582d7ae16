"""The named choices of a recipe, as enums with no heavy imports.

They live here (not beside the code that uses them, which imports torch) so that the CLI can list them in
``--help`` and in shell completion without importing torch. The modules that use them import them from here
and re-export them: ``postquant.recipe.Method`` is ``postquant.choices.Method``.
"""

from __future__ import annotations

import enum

__all__ = [
    "ActRanges",
    "Granularity",
    "GridKind",
    "Importance",
    "Method",
    "Observer",
    "PowerSearch",
    "SquantMode",
    "UnitKind",
]


class Method(enum.StrEnum):
    """How integer codes are chosen."""

    RTN = "rtn"  # nearest rounding
    SQUANT = "squant"  # data-free flips (docs/algorithms.md 2.2)
    ADAROUND = (
        "adaround"  # learned rounding, layer-wise (docs/algorithms.md 2.3; preset in reconstruct.presets)
    )
    BRECQ = "brecq"  # learned rounding, block-wise
    QDROP = "qdrop"  # BRECQ + randomly dropped activation quantization
    LEARNED = "learned"  # this project's measured default of learned rounding
    LEARNED_FAST = "learned-fast"  # the same in an eighth of the steps (signed gradient; reconstruct.presets)
    GPTQ = "gptq"  # Hessian-based column-by-column rounding with error compensation (docs/algorithms.md 2.5)


class SquantMode(enum.StrEnum):
    """Which SQuant stages run after nearest rounding (the ablation of the paper, Table 4)."""

    E = "e"  # nearest rounding only (round half to even, clamp)
    EK = "ek"  # + kernel stage
    EC = "ec"  # + output-channel stage
    EKC = "ekc"  # kernel stage, then output-channel stage: full SQuant


class Granularity(enum.StrEnum):
    """Which weights share one step size."""

    CHANNEL = "channel"  # one (S, Z) per output channel (dim 0)
    TENSOR = "tensor"  # one (S, Z) for the whole tensor
    GROUP = "group"  # one (S, Z) per `group_size` consecutive inputs of one output channel


class GridKind(enum.StrEnum):
    """The family of a weight grid (docs/algorithms.md 1.1, 1.2)."""

    UNIFORM = "uniform"  # affine integer grid
    POWER = "power"  # uniform grid on sign(w)|w/m|^a (PowerQuant-style)
    GGUF_Q4_0 = "gguf-q4_0"  # llama.cpp's Q4_0: blocks of 32 inputs, fp16 scale, w = d*q, q in [-8, 7]
    GGUF_Q4_1 = "gguf-q4_1"  # llama.cpp's Q4_1: blocks of 32 inputs, fp16 scale and minimum, w = d*(q+8) + m
    GGUF_Q8_0 = "gguf-q8_0"  # llama.cpp's Q8_0: blocks of 32 inputs, fp16 scale, w = d*q, q in [-127, 127]

    @property
    def is_gguf(self) -> bool:
        """Whether the grid is one of llama.cpp's block formats (`postquant.grids.gguf`)."""
        return self.value.startswith("gguf-")


class PowerSearch(enum.StrEnum):
    """What the power grid's exponent search minimises (docs/algorithms.md 1.2)."""

    WEIGHTS = "weights"  # the weights' squared error
    OUTPUTS = "outputs"  # the layer's output error, diagonal approximation: sum E[x_j^2] (w - w_hat)^2


class ActRanges(enum.StrEnum):
    """Where activation ranges come from."""

    AUTO = "auto"  # calibration data when given, else the data-free default
    CALIB = "calib"  # observers over calibration data
    SQUANT_NOISE = "squant-noise"  # SQuant reference: one pass of uniform noise, range = s * std
    BN_NOISE = "bn-noise"  # data-free: noise whose activations are re-standardised to the BN statistics
    DYNAMIC = "dynamic"  # no ranges: each token's step from its own absmax at run time (Linear inputs only)


class Observer(enum.StrEnum):
    """How an activation range is chosen from the values seen (`postquant.calib.observers`)."""

    MINMAX = "minmax"
    PERCENTILE = "percentile"
    MSE = "mse"
    STD = "std"  # SQuant's rule: alpha = s * std (docs/algorithms.md 2.2), capped at the max below 6 bits


class Importance(enum.StrEnum):
    """How the damage of quantizing one layer at b bits is predicted (`postquant.mixed.importance`)."""

    LOSS = "loss"  # measured: output KL/MSE vs the float model with only that layer quantized
    TAYLOR = "taylor"  # first-order Taylor: sum |g * (W - Q_b(W))|
    FISHER = "fisher"  # diagonal Fisher: sum g^2 * (W - Q_b(W))^2 / 2
    DATAFREE = "datafree"  # no data: ||W - Q_b(W)||^2 / ||W||^2


class UnitKind(enum.StrEnum):
    """What learned rounding reconstructs at once (`postquant.model.blocks.make_units`)."""

    LAYER = "layer"  # one quantized layer (AdaRound)
    BLOCK = "block"  # one residual / transformer block (BRECQ, QDrop); stem and head layers alone
    BLOCKS = "blocks"  # `blocks_per_unit` consecutive blocks of the same stage
