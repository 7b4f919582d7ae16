"""The typed options of the CLI's commands: each command builds one frozen object from its arguments.

A field left ``None`` was not typed. For `QuantizeOptions`, only the typed recipe fields override the fields
of a ``--recipe`` file (or the recipe defaults): `QuantizeOptions.build_recipe` builds the one validated recipe.

Like `postquant_lab.cli`, this module imports nothing heavy at import time (``postquant --help`` stays fast):
the recipe and torch are imported by the methods that need them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from postquant.choices import ActRanges, Granularity, GridKind, Importance, Method, PowerSearch, SquantMode
from postquant.errors import RecipeError

if TYPE_CHECKING:
    from torch import nn

    from postquant.recipe import Recipe

__all__ = [
    "CompressedTensorsExportOptions",
    "GgufExportOptions",
    "Lab",
    "MixedOptions",
    "OnnxExportOptions",
    "QuantizeOptions",
    "StudyOptions",
]


@dataclass(frozen=True)
class Lab:
    """The functions a command calls to build a model and to quantize it.

    The commands take them from the click context object when it is a `Lab` (``app(obj=Lab(...))``,
    ``CliRunner().invoke(app, args, obj=Lab(...))``): a program embedding the CLI, or a test observing the
    recipe the command builds, passes its own. None: the lab's `postquant_lab.zoo.load_model` and
    `postquant.quantize`.

    Attributes:
        load_model: ``load_model(name)``, the zoo model of a MODEL argument.
        quantize: ``quantize(model, recipe, calib=..., example_inputs=...)``, the quantized module.
    """

    load_model: Callable[[str], Any] | None = None
    quantize: Callable[..., nn.Module] | None = None

    def model_loader(self) -> Callable[[str], Any]:
        """`load_model`, or the zoo's."""
        if self.load_model is not None:
            return self.load_model
        from postquant_lab.zoo import load_model

        return load_model

    def quantizer(self) -> Callable[..., nn.Module]:
        """`quantize`, or `postquant.quantize`."""
        if self.quantize is not None:
            return self.quantize
        import postquant

        return postquant.quantize


@dataclass(frozen=True)
class MixedOptions:
    """The mixed-precision flags of ``quantize`` (None: not typed)."""

    w_bits_budget: float | None = None
    size_budget: str | None = None
    importance: Importance | None = None
    bit_choices: str | None = None  # as typed: "2,3,4,6,8"

    def fields(self) -> dict[str, Any] | None:
        """The typed options as fields of the recipe's ``mixed`` (None when none is typed).

        A budget replaces the recipe file's budget; `importance` and `bit_choices` alone complete the file's.

        Raises:
            RecipeError: `bit_choices` is not a list of integers separated by commas.
        """
        if all(v is None for v in (self.w_bits_budget, self.size_budget, self.importance, self.bit_choices)):
            return None
        mixed: dict[str, Any] = {}
        if self.w_bits_budget is not None or self.size_budget is not None:  # one budget: the other is dropped
            mixed |= {"w_bits_budget": self.w_bits_budget, "size_budget": self.size_budget}
        if self.importance is not None:
            mixed["importance"] = self.importance
        if self.bit_choices is not None:
            try:
                mixed["bit_choices"] = [int(b) for b in self.bit_choices.split(",")]
            except ValueError:
                raise RecipeError(
                    f"--bit-choices takes integers separated by commas, e.g. 2,3,4,6,8; got {self.bit_choices!r}"
                ) from None
        return mixed


# The recipe fields `quantize` has a flag for, in the order they are applied.
RECIPE_FLAGS = (
    "method",
    "w_bits",
    "a_bits",
    "granularity",
    "group_size",
    "squant_mode",
    "act_ranges",
    "calib_size",
    "seed",
    "grid",
    "power_exponent",
    "power_search",
)


@dataclass(frozen=True)
class QuantizeOptions:
    """Everything ``postquant quantize`` was given, built once from its arguments (None: not typed).

    Attributes:
        model: the MODEL argument (a zoo name, module:factory, timm:, torchvision:, hf:).
        recipe_file: the ``--recipe`` YAML file.
        method ... power_search: recipe fields; a typed one overrides the recipe file's.
        mixed: the mixed-precision flags.
        iters, checkpoint_dir: learned rounding (and, for `checkpoint_dir`, mixed-precision importance).
        data, calib, limit: the evaluation data, the calibration data, the evaluation sample count.
        out, json_path, report, overwrite: where the results go.
        device: ``--device`` as typed (auto, cpu, cuda, cuda:N).
        seqlen: tokens per window of a causal LM's calibration and evaluation text.
        sequential: quantize a causal LM one decoder layer at a time (`postquant.quantize_blocks`); None:
            when the model is a causal LM and the recipe is one the block path runs.
    """

    model: str
    recipe_file: Path | None = None
    method: Method | None = None
    w_bits: int | None = None
    a_bits: int | None = None
    granularity: Granularity | None = None
    group_size: int | None = None
    squant_mode: SquantMode | None = None
    act_ranges: ActRanges | None = None
    calib_size: int | None = None
    seed: int | None = None
    grid: GridKind | None = None
    power_exponent: float | None = None
    power_search: PowerSearch | None = None
    mixed: MixedOptions = field(default_factory=MixedOptions)
    iters: int | None = None
    checkpoint_dir: Path | None = None
    data: Path | None = None
    calib: Path | None = None
    limit: int | None = None
    out: Path | None = None
    json_path: Path | None = None
    report: bool = False
    overwrite: bool = False
    device: str = "auto"
    seqlen: int | None = None
    sequential: bool | None = None

    def typed_recipe_fields(self) -> dict[str, Any]:
        """The recipe fields typed on the command line (mixed precision aside), in `RECIPE_FLAGS` order.

        ``--group-size`` without ``--granularity`` means groups (a group size alone would be ignored)."""
        fields = {name: value for name in RECIPE_FLAGS if (value := getattr(self, name)) is not None}
        if self.group_size is not None and self.granularity is None:
            fields["granularity"] = Granularity.GROUP
        return fields

    def build_recipe(self) -> Recipe:
        """The recipe to run: the ``--recipe`` file (or the defaults) with the typed fields over it.

        Raises:
            RecipeError: an invalid field or combination (e.g. ``--iters`` without learned rounding), before
                anything is loaded.
        """
        from postquant.recipe import Recipe

        changes = self.typed_recipe_fields()
        mixed = self.mixed.fields()
        if mixed is not None:
            base = Recipe.coerce(self.recipe_file) if self.recipe_file is not None else None
            if base is not None and base.mixed is not None:
                mixed = {**base.mixed.model_dump(exclude_unset=True), **mixed}
            elif "w_bits_budget" not in mixed:
                raise RecipeError(
                    "--importance and --bit-choices need a budget: --w-bits-budget or --size-budget"
                )
            changes["mixed"] = mixed
        rec = Recipe.coerce(self.recipe_file, **changes)
        if self.checkpoint_dir is not None and rec.learned is None and rec.mixed is None:
            raise RecipeError(
                "--checkpoint-dir saves the finished work of learned rounding or of a mixed-precision "
                "importance measurement: use --method adaround, brecq, qdrop or learned, or a "
                "--w-bits-budget/--size-budget"
            )
        if self.iters is not None and rec.learned is None:
            raise RecipeError(
                "--iters applies to learned rounding: use --method adaround, brecq, qdrop or learned"
            )
        if rec.mixed is not None and self.checkpoint_dir is not None:
            rec = Recipe.coerce(rec, mixed={**rec.mixed.model_dump(), "checkpoint_dir": self.checkpoint_dir})
        learned = {
            k: v for k, v in (("iters", self.iters), ("checkpoint_dir", self.checkpoint_dir)) if v is not None
        }
        if learned and rec.learned is not None:
            rec = Recipe.coerce(rec, learned={**rec.learned.model_dump(), **learned})
        return rec


@dataclass(frozen=True)
class StudyOptions:
    """Everything ``postquant study`` was given (None: the study's per-model default)."""

    axis: str
    models: tuple[str, ...] = ()
    bits: str | None = None
    seeds: int | None = None
    iters: int | None = None
    calib_size: int | None = None
    limit: int | None = None
    out: Path = Path("study")
    variants: str | None = None
    axes: str | None = None
    max_minutes: float | None = None
    run: bool = True
    threads: int = 1

    def variant_labels(self) -> list[str] | None:
        """``--variants`` as a list of labels (None: every variant)."""
        return [s.strip() for s in self.variants.split(",")] if self.variants else None

    def command_options(self) -> dict[str, Any]:
        """The options that `postquant_lab.cli` writes back into the reproducing command line, in order."""
        options: dict[str, Any] = {
            "bits": self.bits,
            "seeds": self.seeds,
            "iters": self.iters,
            "calib_size": self.calib_size,
            "limit": self.limit,
        }
        if self.axis == "all":
            options["axes"] = self.axes
        else:
            options["variants"] = self.variants
        return options | {"out": self.out, "max_minutes": self.max_minutes}


@dataclass(frozen=True)
class OnnxExportOptions:
    """``postquant export onnx``: the run to read, the file to write, the samples to verify on."""

    run_dir: Path
    output: Path = Path("model.onnx")
    verify: int = 256
    trust_code: bool = False
    full_integer: bool = False
    external_data: bool | None = None  # None: above protobuf's 2 GB only
    overwrite: bool = False
    opset: int | None = None  # None: 21 with int4 weights, else 17
    int4: str = "weight-only"
    exporter: str = "torchscript"
    int8_weights: str = "portable"  # or "signed": int8 codes for a CPU with VNNI


@dataclass(frozen=True)
class CompressedTensorsExportOptions:
    """``postquant export compressed-tensors``: the run, the directory to write, the optional check."""

    run_dir: Path
    output: Path
    source: Path | None = None
    verify_text: Path | None = None
    verify_windows: int = 4
    window: int = 256
    overwrite: bool = False
    trust_code: bool = False


@dataclass(frozen=True)
class GgufExportOptions:
    """``postquant export gguf``: the run, the file to write, the GGUF type required, the metadata source."""

    run_dir: Path
    output: Path
    type_: str | None = None
    source_gguf: Path | None = None
    overwrite: bool = False
    trust_code: bool = False
