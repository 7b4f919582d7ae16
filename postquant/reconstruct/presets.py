"""Presets of learned rounding: data, one dict of `LearnedConfig` fields per method.

* ``adaround`` - Nagel et al., "Up or Down? Adaptive Rounding for Post-Training Quantization", ICML 2020:
  layer-wise, rectified sigmoid + regulariser (lambda 0.01, beta 20 -> 2 after 20 % warm-up), Adam 1e-3,
  10k iterations, batch 32; weights only (activation steps are not learned).
* ``brecq`` - Li et al., "BRECQ: Pushing the Limit of Post-Training Quantization by Block Reconstruction",
  ICLR 2021, settings of its code: block-wise, 20k iterations, batch 32, lambda 0.01, 1024 calibration
  samples (the recipe's ``calib_size``), activation steps learned with Adam 4e-5 (cosine), first and last
  layers at 8-bit weights.
* ``qdrop`` - Wei et al., "QDrop: Randomly Dropping Quantization for Extremely Low-bit Post-Training
  Quantization", ICLR 2022: BRECQ plus ``drop_prob = 0.5``.
* ``learned`` - this project's default, chosen by measurement on resnet20-cifar10 W4A4 as the best accuracy
  per unit of time (benchmarks/results/learned.md): QDrop's block reconstruction started from SQuant codes
  instead of nearest rounding, with a 10x larger step (1e-2) and 100x fewer iterations (200 per block).
  SQuant's start already halves the block error of nearest rounding, so few steps suffice.
* ``learned-fast`` - the same start and blocks in an eighth of the steps, for a run of seconds: AutoRound's
  signed gradient descent (Cheng et al., 2023) on a straight-through offset, its learning rate ``1 / iters``
  decayed linearly to 0 (so an offset can cross its rounding interval once whatever ``iters`` is), batches of
  16, a quarter of the calibration samples, no QDrop mixing (in so few steps it costs accuracy), activation
  steps kept from calibration and measured on a quarter of the observer sample (the recipe's
  ``a_observer_samples``), the keep-the-start check on 64 samples (benchmarks/results/learned_fast.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from postquant.reconstruct.config import LearnedConfig

if TYPE_CHECKING:
    from postquant.recipe import Recipe

_BRECQ: dict[str, Any] = {
    "unit": "block",
    "variable": "adaround",
    "codes": "rounding",
    "loss": "mse",
    "optimizer": "adam",
    "lr": 1e-3,
    "iters": 20000,
    "batch_size": 32,
    "reg_lambda": 0.01,
    "beta_start": 20.0,
    "beta_end": 2.0,
    "warmup": 0.2,
    "learn_act_scales": True,
    "act_lr": 4e-5,
    "drop_prob": 0.0,
    "init": "nearest",
    "first_last_w_bits": 8,
}

PRESETS: dict[str, dict[str, Any]] = {
    "adaround": {
        **_BRECQ,
        "unit": "layer",
        "iters": 10000,
        "learn_act_scales": False,
        "first_last_w_bits": None,
    },
    "brecq": dict(_BRECQ),
    "qdrop": {**_BRECQ, "drop_prob": 0.5},
    "learned": {
        **_BRECQ,
        "lr": 1e-2,
        "iters": 200,
        "init": "squant",
        "drop_prob": 0.5,
        "first_last_w_bits": None,
        # random half of the weights at <= 2 bits (benchmarks/results/default_check/: resnet20 W2A4 72.03 ->
        # 74.34 over 3 seeds), all of them above
        "selection": "auto",
    },
}

PRESETS["learned-fast"] = {
    **PRESETS["learned"],
    "variable": "ste",
    "optimizer": "signsgd",
    "lr_schedule": "linear",
    "iters": 25,
    "lr": 1 / 25,
    "batch_size": 16,  # resnet20 W4A4, 3 seeds: 80.43 (batches of 32: 80.23) in half the step time
    "learn_act_scales": False,
    "max_samples": 256,
    # resnet20 W4A4, 3 seeds, with the two below: QDrop's float mixing off 80.62, on 80.35 (and slower)
    "drop_prob": 0.0,
    "check_samples": 64,  # the keep-the-start check on a quarter of the cache: the same decisions there
}

# Fields a preset derives from others when the user does not set them: {preset: {field: f(fields)}}.
DERIVED: dict[str, dict[str, Any]] = {"learned-fast": {"lr": lambda fields: 1 / max(int(fields["iters"]), 1)}}

LEARNED_METHODS = frozenset(PRESETS)


def _with_changes(name: str, changes: dict[str, Any]) -> dict[str, Any]:
    """A preset's fields with the user's `changes` on top, derived fields following them (`DERIVED`)."""
    fields = {**PRESETS[name], **changes}
    for key, derive in DERIVED.get(name, {}).items():
        if key not in changes:
            fields[key] = derive(fields)
    return fields


def preset(name: str, **changes: Any) -> LearnedConfig:
    """The `LearnedConfig` of a preset, with `changes` applied."""
    return LearnedConfig.model_validate(_with_changes(name, changes))


def resolve_learned(data: Any) -> Any:
    """Recipe pre-validation: fill ``learned`` with the method's preset, the user's fields on top.

    The stored recipe then holds the complete, effective config, so ``to_yaml`` round-trips exactly. A
    recipe whose ``learned`` is already complete keeps it when only ``method`` changes; pass
    ``learned=None`` to take the new method's preset.
    """
    if not isinstance(data, dict):
        return data
    method = data.get("method")
    method = getattr(method, "value", method)
    if method not in PRESETS:
        return data
    user = data.get("learned")
    if user is None:  # also the path of `recipe.method = ...` (assignment validation)
        return {**data, "learned": preset(method)}
    if isinstance(user, LearnedConfig):
        return {**data, "learned": preset(method, **user.model_dump(exclude_unset=True))}
    if isinstance(user, dict):  # validated as a field, so errors name e.g. 'learned.iters'
        return {**data, "learned": _with_changes(method, user)}
    return data


def is_learned(recipe: Recipe) -> bool:
    """Whether the recipe's method is a learned-rounding method."""
    return recipe.method.value in PRESETS


def learned_config(recipe: Recipe) -> LearnedConfig:
    """The effective learned config of a recipe (its ``learned`` field, else its method's preset)."""
    return recipe.learned if recipe.learned is not None else preset(recipe.method.value)
