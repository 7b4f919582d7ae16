"""`LearnedConfig`: every choice of learned rounding (AdaRound / BRECQ / QDrop family) as a typed field.

The fields follow the axes of docs/algorithms.md 2.4 (the study "challenging common choices in gradient-based
PTQ"): the reconstruction unit (granularity), the optimised variable, the degrees of freedom, the loss, the
optimizer, the weight selection, the calibration source and augmentation. The presets that reproduce
AdaRound (Nagel et al., ICML 2020), BRECQ (Li et al., ICLR 2021) and QDrop (Wei et al., ICLR 2022) are data
in `postquant.reconstruct.presets`.
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator

from postquant.calib.augment import Augmentation
from postquant.choices import UnitKind


class Variable(enum.StrEnum):
    """The optimised variable that decides the rounding of each weight."""

    ADAROUND = "adaround"  # rectified sigmoid h(V) plus the annealed regulariser (AdaRound eq. 21-23)
    STE = "ste"  # a direct continuous offset, rounded in the forward pass, straight-through gradient
    SIGMOID = "sigmoid"  # a plain sigmoid offset without regulariser, rounded at the end


class CodeRange(enum.StrEnum):
    """Where the learned codes may go (the first degree of freedom)."""

    ROUNDING = "rounding"  # {floor(x), floor(x) + 1}: only the rounding direction is learned
    GRID = "grid"  # anywhere on the integer grid [qmin, qmax] (variable 'ste' only)


class Loss(enum.StrEnum):
    """What the reconstruction minimises."""

    MSE = "mse"  # squared error of the unit output against the float model's (BRECQ's `lp_loss`, p=2)
    FISHER = "fisher"  # the same, weighted per element by squared output gradients (BRECQ `fisher_diag`)
    OUTPUT = "output"  # KL or MSE between the quantized and float models' final outputs


class OutputMetric(enum.StrEnum):
    """Distance on the final output for ``loss='output'`` (and the gradients of ``loss='fisher'``)."""

    AUTO = "auto"  # KL for 2-D outputs (class logits), MSE otherwise
    KL = "kl"
    MSE = "mse"


class Optimizer(enum.StrEnum):
    ADAM = "adam"
    ADAMW = "adamw"
    SGD = "sgd"  # with `momentum`
    RMSPROP = "rmsprop"
    SIGNSGD = "signsgd"  # AutoRound's signed gradient descent: p -= lr * sign(grad) (Cheng et al., 2023)


class Schedule(enum.StrEnum):
    CONSTANT = "constant"
    COSINE = "cosine"
    LINEAR = "linear"  # from lr down to 0 over the unit's iterations (AutoRound's decay)


class Selection(enum.StrEnum):
    """Which weights are learned; the others keep their initial code (nearest unless ``init='squant'``)."""

    ALL = "all"
    BAND = "band"  # only weights whose fractional part is within 0.5 +- `band`
    RANDOM = "random"  # a seeded random `fraction` of the weights
    AUTO = "auto"  # `random` in layers of at most AUTO_RANDOM_MAX_BITS weight bits, else `all` (measured)


# Random selection helps at 2 bits (resnet20 W2A4 +2.3 at the full budget, +4.6 in the study) and is within
# noise or worse at 4 (benchmarks/results/default_check/); 3 bits is not measured on a CNN.
AUTO_RANDOM_MAX_BITS = 2


class Init(enum.StrEnum):
    """Starting codes of the learned rounding."""

    NEAREST = "nearest"
    SQUANT = "squant"  # SQuant flips (docs/algorithms.md 2.2), then learned from there


class CalibSource(enum.StrEnum):
    """Where the calibration inputs of the reconstruction come from."""

    DATA = "data"  # the calibration data passed in (the model's own set, or another dataset)
    SYNTHETIC = "synthetic"  # distilled to match BatchNorm statistics (ZeroQ); models with BatchNorm only
    NOISE = "noise"  # standard normal noise of the example input's shape


# LearnedConfig fields added later, with the default at which they are left out of dumps (and so of keys).
_LATER_FIELDS: dict[str, Any] = {
    "max_samples": None,
    "check_samples": None,
    "learn_weight_range": False,
    "range_lr": None,
    "keep_best_step": False,
    "autocast": None,
}

# Bounds of the learned range multipliers (`learn_weight_range`): a row's range can shrink to a quarter of
# its start, never grow past it.
RANGE_BOUNDS = (0.25, 1.0)

# LearnedConfig fields that do not change the result: left out of checkpoint keys.
BOOKKEEPING = frozenset({"checkpoint_dir", "progress", "chain_inputs"})


class LearnedConfig(BaseModel):
    """One learned-rounding run. The defaults are BRECQ's published settings (docs/algorithms.md 2.3)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # granularity
    unit: UnitKind = Field(default=UnitKind.BLOCK, description="layer | block | blocks")
    blocks_per_unit: int = Field(default=2, ge=1, description="blocks per unit for unit='blocks'")
    block_patterns: list[str] = Field(
        default_factory=list,
        description="globs on module names that name the blocks (e.g. 'layer*.*'); empty: found automatically",
    )
    # variable and degrees of freedom
    variable: Variable = Variable.ADAROUND
    codes: CodeRange = CodeRange.ROUNDING
    learn_weight_scales: bool = Field(default=False, description="also learn one weight step per grid row")
    learn_weight_range: bool = Field(
        default=False,
        description="also learn each uniform grid row's range: multipliers in [0.25, 1] on its lower and "
        "upper end, the step and the integer zero point following them (AutoRound's min/max tuning; "
        "variable='ste'; a symmetric grid learns one multiplier and keeps zero points at 0)",
    )
    learn_act_scales: bool = Field(default=True, description="learn activation step sizes (LSQ) if quantized")
    learn_bias: bool = False
    # loss
    loss: Loss = Loss.MSE
    output_metric: OutputMetric = OutputMetric.AUTO
    # optimisation
    optimizer: Optimizer = Optimizer.ADAM
    lr: float = Field(default=1e-3, gt=0, description="learning rate of the rounding variables")
    momentum: float = Field(default=0.9, ge=0, lt=1, description="for optimizer='sgd'")
    lr_schedule: Schedule = Schedule.CONSTANT
    scale_lr: float = Field(default=1e-4, gt=0, description="learning rate of weight scales and biases")
    range_lr: float | None = Field(
        default=None, gt=0, description="learning rate of the range multipliers (None: `lr`, as AutoRound)"
    )
    act_lr: float = Field(default=4e-5, gt=0, description="learning rate of activation step sizes (cosine)")
    iters: int = Field(default=20000, ge=0, description="optimisation steps per unit")
    batch_size: int = Field(default=32, ge=1)
    reg_lambda: float = Field(default=0.01, ge=0, description="weight of the rounding regulariser")
    beta_start: float = Field(default=20.0, gt=0)
    beta_end: float = Field(default=2.0, gt=0)
    warmup: float = Field(default=0.2, ge=0, lt=1, description="fraction of iters without regulariser")
    drop_prob: float = Field(default=0.0, ge=0, lt=1, description="QDrop: keep activations float w.p.")
    # which weights, from where
    selection: Selection = Selection.ALL
    band: float = Field(default=0.25, gt=0, le=0.5, description="selection='band': |frac - 0.5| <= band")
    fraction: float = Field(
        default=0.5, gt=0, le=1, description="selection='random' (or 'auto' at low bits): share learned"
    )
    init: Init = Init.NEAREST
    keep_better_start: bool = Field(
        default=True,
        description="keep a unit's starting codes when the learned ones reconstruct its cached data worse "
        "(measured on quantized inputs, without QDrop's float mixing)",
    )
    keep_best_step: bool = Field(
        default=False,
        description="end a unit's steps on the variables of the step with the lowest loss (on its own batch), "
        "not the last one's (AutoRound keeps its best iterate so); variable='ste', whose step loss is the loss "
        "of the hard codes",
    )
    autocast: Literal["bfloat16"] | None = Field(
        default=None,
        description="run each optimisation step's forward under torch.autocast in this dtype (matmuls in "
        "bfloat16 with float32 sums, the loss in float32), as AutoRound does by default: several times faster "
        "on GPUs and on CPUs with AMX or AVX-512 BF16; the before/after check of a unit stays float32. None: "
        "float32 steps",
    )
    check_samples: int | None = Field(
        default=None,
        ge=1,
        description="cached samples the before/after check of each unit runs on (the first ones, in whole "
        "chunks of 128 or fewer; None: all of them); it also gives the reported unit errors",
    )
    first_last_w_bits: int | None = Field(
        default=None, ge=2, le=8, description="weight bits of the first and last layers (None: the recipe's)"
    )
    # calibration data
    calib_source: CalibSource = CalibSource.DATA
    synthetic_steps: int = Field(default=200, ge=1, description="Adam steps of BN-statistics distillation")
    augment: list[Augmentation] = Field(default_factory=list, description="flip, shift, noise, mixup")
    augment_copies: int = Field(default=1, ge=1, description="augmented copies added per input")
    max_samples: int | None = Field(
        default=None,
        ge=1,
        description="calibration samples the reconstruction uses, whole batches spread evenly over the "
        "calibration set (None: all of them); activation ranges still use the whole set",
    )
    max_cache_mb: int = Field(
        default=1024, ge=1, description="cache bound per device (model device, then CPU)"
    )
    # bookkeeping (not part of the result)
    checkpoint_dir: Path | None = Field(default=None, description="resume directory for finished units")
    progress: bool = Field(default=True, description="tqdm bar per unit")
    chain_inputs: bool = Field(
        default=True,
        description="MSE loss, whole-model path: take a unit's inputs from the previous unit's outputs where "
        "batch 0 shows that the model chains them (same codes, fewer forwards); False: run the model "
        "prefixes for every batch",
    )

    @model_serializer(mode="wrap")
    def _without_unset_new_fields(self, handler: Any) -> dict[str, Any]:
        """Fields added after checkpoints and result tables were keyed are left out at their defaults, so
        every key made before stays the same."""
        data = handler(self)
        for name, default in _LATER_FIELDS.items():
            if getattr(self, name) == default:
                data.pop(name, None)
        return data

    @model_validator(mode="after")
    def _consistent(self) -> LearnedConfig:
        if self.codes is CodeRange.GRID and self.variable is not Variable.STE:
            raise ValueError(
                f"codes='grid' needs variable='ste' (variable='{self.variable.value}' can only choose "
                "between floor and floor+1); use codes='rounding'"
            )
        if self.learn_weight_range and self.variable is not Variable.STE:
            raise ValueError(
                f"learn_weight_range needs variable='ste' (the code follows the moving grid; variable="
                f"'{self.variable.value}' rounds from the starting grid's floor); or use learn_weight_scales"
            )
        if self.keep_best_step and self.variable is not Variable.STE:
            raise ValueError(
                f"keep_best_step needs variable='ste': a step of variable='{self.variable.value}' runs soft "
                "weights, so its loss is not the loss of the codes it would keep"
            )
        if self.learn_weight_range and self.learn_weight_scales:
            raise ValueError(
                "learn_weight_range already learns each row's step (with its zero point); "
                "set only one of learn_weight_range and learn_weight_scales"
            )
        return self

    def result_fields(self) -> dict[str, object]:
        """The fields that change the result (for checkpoint keys): all but bookkeeping."""
        return self.model_dump(mode="json", exclude=BOOKKEEPING)
