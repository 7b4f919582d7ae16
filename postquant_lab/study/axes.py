"""The study's axes (docs/algorithms.md 2.4 and 3) as data: each axis is a baseline and variants of recipe changes.

A variant's ``changes`` are recipe fields applied on top of the study's base recipe (see
`postquant_lab.study.runner.base_recipe`); the key ``"learned"`` holds `LearnedConfig` fields, merged into the
base's learned config. A value ``"@w_bits"`` stands for the study's weight bits (as a float), so the mixed
precision budget follows the bits being studied. ``calib_data="other"`` calibrates on another dataset
(`postquant_lab.study.runner.OTHER_CALIB`) instead of the model's own calibration set.

A variant that cannot run on a model (no other dataset known, a recipe the model rejects) is reported as
"unavailable: <reason>" instead of being run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from postquant.errors import RecipeError, unknown_name

CalibData = Literal["own", "other"]
W_BITS = "@w_bits"  # placeholder in variant changes: the study's weight bits, as a float


@dataclass(frozen=True)
class Variant:
    """One setting of an axis.

    Attributes:
        label: short name, unique within the axis (used on the command line and in tables).
        changes: recipe fields on top of the base recipe; ``"learned"`` is a dict of `LearnedConfig` fields.
        calib_data: ``"own"`` (the model's calibration set) or ``"other"`` (another dataset).
        images_only: the variant needs image inputs (augmentations, BatchNorm-matched or noise images);
            on a text model it is reported as unavailable instead of being run.
    """

    label: str
    changes: dict[str, Any] = field(default_factory=dict)
    calib_data: CalibData = "own"
    images_only: bool = False


@dataclass(frozen=True)
class Axis:
    """One question of the study: the same model, bits and data, only this choice changes.

    Attributes:
        name: command-line name, e.g. ``"selection"``.
        title: the heading in reports.
        description: what is varied and why (docs/algorithms.md section).
        baseline: the label of the variant every other one is compared with.
        variants: the settings, baseline included.
    """

    name: str
    title: str
    description: str
    baseline: str
    variants: tuple[Variant, ...]

    def variant(self, label: str) -> Variant:
        """The variant named `label`.

        Raises:
            UnknownNameError: no such variant (the message suggests close labels).
        """
        for v in self.variants:
            if v.label == label:
                return v
        raise unknown_name(f"variant of axis {self.name!r}", label, [v.label for v in self.variants])


def _learned(**fields: Any) -> dict[str, Any]:
    return {"learned": fields}


AXES: tuple[Axis, ...] = (
    Axis(
        "selection",
        "Weight selection",
        "Which weights are optimised; the others keep their initial (SQuant) code (2.4 i).",
        "all",
        (
            Variant("all", _learned(selection="all")),
            Variant("band 0.25", _learned(selection="band", band=0.25)),
            Variant("band 0.1", _learned(selection="band", band=0.1)),
            Variant("random 0.5", _learned(selection="random", fraction=0.5)),
        ),
    ),
    Axis(
        "augmentation",
        "Feature augmentation",
        "One augmented copy of every calibration input added (2.4 ii); image models only.",
        "none",
        (
            Variant("none", _learned(augment=[])),
            Variant("flip+shift", _learned(augment=["flip", "shift"], augment_copies=1), images_only=True),
            Variant("noise", _learned(augment=["noise"], augment_copies=1), images_only=True),
            Variant("mixup", _learned(augment=["mixup"], augment_copies=1), images_only=True),
        ),
    ),
    Axis(
        "calib-size",
        "Calibration set size",
        "Number of calibration samples, from the model's own calibration set (2.4 iii).",
        "256",
        (
            Variant("64", {"calib_size": 64}),
            Variant("256", {"calib_size": 256}),
            Variant("1024", {"calib_size": 1024}),
        ),
    ),
    Axis(
        "calib-source",
        "Calibration set source",
        "Where the calibration inputs come from, same count (2.4 iii): the model's own set, another dataset "
        "preprocessed for the model, data distilled to match BatchNorm statistics, Gaussian noise.",
        "data",
        (
            Variant("data", _learned(calib_source="data")),
            Variant("other dataset", _learned(calib_source="data"), calib_data="other"),
            Variant("synthetic (BN)", _learned(calib_source="synthetic"), images_only=True),
            Variant("noise", _learned(calib_source="noise"), images_only=True),
        ),
    ),
    Axis(
        "loss",
        "Loss",
        "What the reconstruction minimises (2.4 iv): unit output MSE, Fisher-weighted MSE, final output.",
        "mse",
        (
            Variant("mse", _learned(loss="mse")),
            Variant("fisher", _learned(loss="fisher")),
            Variant("output", _learned(loss="output")),
        ),
    ),
    Axis(
        "dof",
        "Degrees of freedom",
        "What is learned (2.4 v), cumulative: rounding direction only; codes anywhere on the grid (needs the "
        "STE variable); + one weight step per row; + activation step sizes; + biases.",
        "rounding",
        (
            Variant(
                "rounding", _learned(learn_weight_scales=False, learn_act_scales=False, learn_bias=False)
            ),
            Variant(
                "grid codes (ste)",
                _learned(
                    variable="ste",
                    codes="grid",
                    learn_weight_scales=False,
                    learn_act_scales=False,
                    learn_bias=False,
                ),
            ),
            Variant(
                "+ weight scales",
                _learned(
                    variable="ste",
                    codes="grid",
                    learn_weight_scales=True,
                    learn_act_scales=False,
                    learn_bias=False,
                ),
            ),
            Variant(
                "+ act scales",
                _learned(
                    variable="ste",
                    codes="grid",
                    learn_weight_scales=True,
                    learn_act_scales=True,
                    learn_bias=False,
                ),
            ),
            Variant(
                "+ bias",
                _learned(
                    variable="ste",
                    codes="grid",
                    learn_weight_scales=True,
                    learn_act_scales=True,
                    learn_bias=True,
                ),
            ),
        ),
    ),
    Axis(
        "grid",
        "Non-uniform grid",
        "Uniform affine grid vs PowerQuant-style power grid with a searched exponent (2.4 vi, docs/algorithms.md 1.2).",
        "uniform",
        (
            Variant("uniform", {}),
            Variant("power", {"grid": "power", "power_exponent": None}),
        ),
    ),
    Axis(
        "variable",
        "Optimised variable",
        "Rectified sigmoid + regulariser (AdaRound), straight-through continuous offset, plain sigmoid (2.4 vii).",
        "adaround",
        (
            Variant("adaround", _learned(variable="adaround")),
            Variant("ste", _learned(variable="ste")),
            Variant("sigmoid", _learned(variable="sigmoid")),
        ),
    ),
    Axis(
        "optimizer",
        "Optimizer",
        "Optimizer of the rounding variables at comparable step sizes (2.4 viii); Adam 1e-2 is the default.",
        "adam 1e-2",
        (
            Variant("adam 1e-2", _learned(optimizer="adam", lr=1e-2)),
            Variant("adamw 1e-2", _learned(optimizer="adamw", lr=1e-2)),
            Variant("rmsprop 1e-2", _learned(optimizer="rmsprop", lr=1e-2)),
            Variant("sgd 0.1", _learned(optimizer="sgd", lr=0.1, momentum=0.9)),
            Variant("sgd 1.0", _learned(optimizer="sgd", lr=1.0, momentum=0.9)),
        ),
    ),
    Axis(
        "granularity",
        "Granularity",
        "What is reconstructed at once (2.4 ix): one layer, one block, two consecutive blocks.",
        "block",
        (
            Variant("layer", _learned(unit="layer")),
            Variant("block", _learned(unit="block")),
            Variant("2 blocks", _learned(unit="blocks", blocks_per_unit=2)),
        ),
    ),
    Axis(
        "mixed",
        "Mixed precision",
        "Uniform weight bits vs importance-based mixed precision at the same average weight bits "
        "(docs/algorithms.md 3; the budget is the study's weight bits).",
        "uniform",
        (
            Variant("uniform", {}),
            Variant("mixed (loss)", {"mixed": {"w_bits_budget": W_BITS, "importance": "loss"}}),
        ),
    ),
)

AXIS_NAMES: tuple[str, ...] = tuple(a.name for a in AXES)


def get_axis(name: str) -> Axis:
    """The axis called `name`.

    Raises:
        UnknownNameError: an unknown axis (the message suggests close names and lists them all).
    """
    for axis in AXES:
        if axis.name == name:
            return axis
    raise unknown_name("axis", name, AXIS_NAMES)


COMBINED = "combined"  # the name of the axis `combined_axis` builds


def combined_axis(trials: list[list[tuple[Axis, Variant]]], kept: int | None = None) -> Axis:
    """The base against combinations of variants from different axes (the study's best-combination search).

    Each trial is a list of (axis, variant) pairs, at most one per axis; its changes are merged in the
    order of `AXES` (``learned`` fields merged field by field; a later axis wins where two set the same
    field) and its calibration data is the other dataset if any part uses it. `kept`: the index of the
    trial the search kept, named in the description.

    Raises:
        RecipeError: no trial, or an empty one (with no helping variant the base is the best combination).
    """
    if not trials or not all(trials):
        raise RecipeError("no variant to combine: the base is the best combination found")
    order = {a.name: i for i, a in enumerate(AXES)}
    variants = [Variant("base", {})]
    for parts in trials:
        parts = sorted(parts, key=lambda p: order.get(p[0].name, len(order)))
        changes: dict[str, Any] = {}
        for _, variant in parts:
            for key, value in variant.changes.items():
                changes[key] = {**changes.get(key, {}), **value} if key == "learned" else value
        label = " + ".join(f"{axis.name}: {variant.label}" for axis, variant in parts)
        calib: CalibData = "other" if any(v.calib_data == "other" for _, v in parts) else "own"
        variants.append(Variant(label, changes, calib, images_only=any(v.images_only for _, v in parts)))
    description = (
        "Greedy search over the variant that helps most on each axis: start from the one with the largest "
        "gain, add the others in order of gain, keep each addition only if the mean improves."
    )
    if kept is not None:
        description += f" Kept: **{variants[kept + 1].label}**."
    return Axis(COMBINED, "Best combination", description, "base", tuple(variants))


def fill_bits(changes: Any, w_bits: int) -> Any:
    """`changes` with every ``"@w_bits"`` value replaced by `w_bits` (a float), recursively."""
    if isinstance(changes, dict):
        return {k: fill_bits(v, w_bits) for k, v in changes.items()}
    if isinstance(changes, list):
        return [fill_bits(v, w_bits) for v in changes]
    return float(w_bits) if changes == W_BITS else changes
