"""Recipes: a typed, validated description of one quantization run (YAML in, YAML out)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from postquant.calib.act_ranges import ActRanges
from postquant.calib.observers import Observer
from postquant.choices import Method, PowerSearch
from postquant.errors import OutputError, RecipeError, unknown_name
from postquant.grids import Granularity, Grid, GridKind, RangeMethod, fit_grid
from postquant.grids.gguf import BLOCK as GGUF_BLOCK
from postquant.grids.gguf import block_format
from postquant.mixed.config import MixedConfig
from postquant.reconstruct.config import LearnedConfig
from postquant.reconstruct.presets import resolve_learned
from postquant.rounding.squant import SquantMode
from postquant.store.files import write_text_atomic


class LayerOverride(BaseModel):
    """Settings for the layers a pattern matches; unset fields inherit from the recipe.

    ``w_bits: null`` keeps the layer's weights float (the layer is skipped); ``a_bits: null`` keeps its
    input float.
    """

    model_config = ConfigDict(extra="forbid")
    w_bits: int | None = Field(default=None, ge=2, le=8)
    a_bits: int | None = Field(default=None, ge=2, le=8)

    @model_serializer(mode="wrap")
    def _only_set_fields(self, handler: Any) -> dict[str, Any]:
        # An unset field inherits, a field set to null means float: dumping must keep that difference.
        return {k: v for k, v in handler(self).items() if k in self.model_fields_set}


class GptqConfig(BaseModel):
    """GPTQ's settings (docs/algorithms.md 2.5)."""

    model_config = ConfigDict(extra="forbid")

    damp: float = Field(default=0.01, gt=0, le=1, description="diagonal damping, a fraction of mean(diag H)")
    act_order: bool = Field(default=False, description="round columns in order of decreasing H_jj")
    block_size: int = Field(default=128, ge=1, description="columns per lazy-update block")


class EmbeddingConfig(BaseModel):
    """Weight-only quantization of the model's ``nn.Embedding`` tables (docs/usage.md).

    Each table is quantized by nearest rounding (data-free, whatever the recipe's method: learned rounding,
    SQuant and GPTQ choose codes for Conv/Linear layers only) on a uniform grid with one step per row (each
    token's vector: the grid's channel axis is dim 0) or per group of `group_size` values along dim 1.
    """

    model_config = ConfigDict(extra="forbid")

    bits: int = Field(default=8, ge=2, le=8, description="bits per table value, 2..8")
    group_size: int | None = Field(
        default=None, ge=1, description="values per step along each row; null = one step per row"
    )
    symmetric: bool = Field(default=False, description="zero point 0 (else the affine grid, as the recipe's)")
    w_range: RangeMethod = Field(
        default=RangeMethod.MINMAX, description="range per row or group: minmax, mse or lp"
    )

    @property
    def granularity(self) -> Granularity:
        """Channel (one step per row) or group (`group_size` values of a row per step)."""
        return Granularity.CHANNEL if self.group_size is None else Granularity.GROUP

    def grid(self, table: torch.Tensor) -> Grid:
        """The uniform grid this config gives an embedding table (V, D) (per row or per group along D)."""
        return fit_grid(
            table,
            self.bits,
            GridKind.UNIFORM,
            self.granularity,
            symmetric=self.symmetric,
            range_method=self.w_range,
            group_size=self.group_size or 0,
        )


def _default_overrides() -> dict[str, LayerOverride]:
    # The reference convention (SQuant, BRECQ): the image input of the first layer stays float and the
    # input of the last layer is 8-bit.
    return {"@first": LayerOverride(a_bits=None), "@last": LayerOverride(a_bits=8)}


class Recipe(BaseModel):
    """One quantization run. Every field has a default; `w_bits` and `method` are the usual choices."""

    model_config = ConfigDict(extra="forbid", use_enum_values=False, validate_assignment=True)

    method: Method = Method.RTN
    w_bits: int = Field(default=4, ge=2, le=8, description="weight bits, 2..8")
    a_bits: int | None = Field(default=None, ge=2, le=8, description="activation bits, null = weight-only")
    granularity: Granularity = Granularity.CHANNEL
    group_size: int = Field(default=128, ge=1, description="inputs per group for granularity 'group'")
    symmetric: bool = False
    w_range: RangeMethod = Field(
        default=RangeMethod.MINMAX, description="weight range: minmax, mse or lp search"
    )
    grid: GridKind = Field(
        default=GridKind.UNIFORM,
        description="weight grid: uniform, power (docs/algorithms.md 1.2), or one of llama.cpp's block formats "
        "gguf-q4_0, gguf-q4_1, gguf-q8_0 (blocks of 32 inputs with fp16 scales; they fix w_bits, granularity, "
        "group_size and symmetric)",
    )
    power_exponent: float | None = Field(
        default=None,
        gt=0,
        le=1,
        allow_inf_nan=False,
        description="power grid exponent a; null = searched per layer",
    )
    power_search: PowerSearch = Field(
        default=PowerSearch.WEIGHTS,
        description="error the power exponent search minimises: weights (SSE) or outputs (needs calib data)",
    )
    act_ranges: ActRanges = Field(
        default=ActRanges.AUTO,
        description="where input ranges come from: auto (calib with data, else data-free), calib, squant-noise, "
        "bn-noise (static: one range per layer input), or dynamic: no ranges, each token (row of a Linear's "
        "input along its last dimension) is quantized at run time with its own step max|x|/(2^(a_bits-1)-1), "
        "symmetric codes in [-(2^(a_bits-1)-1), 2^(a_bits-1)-1] (vLLM's int8 W8A8 per-token scheme); needs no "
        "calibration data",
    )
    a_observer: Observer | None = Field(
        default=None,
        description="activation range observer; null = the measured default: mse for learned rounding, "
        "percentile for bn-noise ranges, else minmax",
    )
    a_percentile: float = Field(default=99.99, gt=50, le=100)
    a_observer_samples: int | None = Field(
        default=None,
        ge=1024,
        description="values per layer input the mse and std observers keep (a seeded sample); null = "
        "2^20, 2^18 for the learned-fast method (a quarter of the range search)",
    )
    a_residual: bool = Field(
        default=False,
        description="integer residuals: also quantize (8-bit) the conv outputs that feed residual adds, the "
        "adds' other operands (with the quantizer of the layer that takes them) and the input of global "
        "average pooling, as export_onnx(full_integer=True) does; ranges from the calibration pass "
        "(act_ranges: calib or auto with data)",
    )
    ignore: list[str] = Field(default_factory=list, description="names, globs, 'type:Name' or 're:...'")
    overrides: dict[str, LayerOverride] = Field(
        default_factory=_default_overrides,
        description="pattern -> settings; '@first' and '@last' are the first and last quantizable layers",
    )
    fold_bn: bool = True
    squant_mode: SquantMode = SquantMode.EKC
    calib_size: int = Field(default=1024, ge=1)
    seed: int = Field(default=0, ge=0, le=2**63 - 1, description="random seed, 0..2^63-1")
    learned: LearnedConfig | None = Field(
        default=None, description="learned rounding settings; filled from the method's preset, fields on top"
    )
    mixed: MixedConfig | None = Field(
        default=None, description="mixed precision: weight bits per layer from an importance and a budget"
    )
    gptq: GptqConfig | None = Field(
        default=None, description="GPTQ settings (method: gptq); defaults if unset"
    )
    embeddings: EmbeddingConfig | None = Field(
        default=None,
        description="quantize nn.Embedding tables weight-only by nearest rounding (bits, group_size, "
        "symmetric, w_range); null = they stay float",
    )

    @model_serializer(mode="wrap")
    def _without_unset_gptq(self, handler: Any) -> dict[str, Any]:
        # Recipes without GPTQ settings (or observer samples) dump as before the fields existed (their
        # fingerprints stay the same).
        data = handler(self)
        if self.gptq is None:
            data.pop("gptq", None)
        if self.a_observer_samples is None:  # added later: left out at its default, as gptq
            data.pop("a_observer_samples", None)
        if not self.a_residual:  # likewise recipes without integer residuals
            data.pop("a_residual", None)
        if self.embeddings is None:  # and recipes that keep their embeddings float
            data.pop("embeddings", None)
        return data

    @property
    def gptq_config(self) -> GptqConfig:
        """The effective GPTQ settings."""
        return self.gptq if self.gptq is not None else GptqConfig()

    @model_validator(mode="before")
    @classmethod
    def _learned_preset(cls, data: Any) -> Any:
        return resolve_learned(data)

    @model_validator(mode="before")
    @classmethod
    def _gguf_fields(cls, data: Any) -> Any:
        """A GGUF grid fills the fields its format fixes (bits, blocks of 32 inputs, symmetry) when not given."""
        if not isinstance(data, dict):
            return data
        try:
            kind = GridKind(data.get("grid", GridKind.UNIFORM))
        except ValueError:
            return data  # the field's own validation names the bad value
        if not kind.is_gguf:
            return data
        return {**_gguf_fixed(kind), **data}

    @model_validator(mode="after")
    def _gguf_fixes_the_grid(self) -> Recipe:
        if not self.grid.is_gguf:
            return self
        fmt = block_format(self.grid)
        fixed = _gguf_fixed(self.grid)
        clash = [
            f"{k}: {getattr(v, 'value', v)}"
            for k, v in fixed.items()
            if (k == "w_bits" or k in self.model_fields_set) and getattr(self, k) != v
        ]
        if clash:
            raise ValueError(
                f"grid {self.grid.value} is llama.cpp's {fmt.ggml_name}: {fmt.bits}-bit codes in blocks of "
                f"{GGUF_BLOCK} inputs, {'asymmetric' if fmt.has_min else 'symmetric'}; set "
                f"{', '.join(clash)} (or leave them out)"
            )
        bad = [p for p, o in self.overrides.items() if o.w_bits not in (None, 4, 8)]
        if bad:
            raise ValueError(
                f"grid {self.grid.value}: the overrides {', '.join(repr(p) for p in bad)} ask for a bit width "
                "llama.cpp's Q4_0/Q4_1/Q8_0 do not have; use w_bits 4, 8 or null (float)"
            )
        return self

    @model_validator(mode="after")
    def _gptq_needs_an_affine_grid(self) -> Recipe:
        if self.method is Method.GPTQ and self.grid is GridKind.POWER:
            raise ValueError("method gptq updates weights on an affine grid: use grid uniform or a gguf grid")
        if self.gptq is not None and self.method is not Method.GPTQ:
            raise ValueError(f"gptq settings apply to method gptq, not {self.method.value}: drop them")
        return self

    @model_validator(mode="after")
    def _lp_range_needs_integer_zero_points(self) -> Recipe:
        if self.w_range is RangeMethod.LP and self.grid.is_gguf:
            raise ValueError(
                f"w_range 'lp' searches integer zero points, which grid {self.grid.value} does not have: use "
                "w_range 'minmax' or 'mse' with a GGUF grid"
            )
        return self

    @model_validator(mode="after")
    def _learned_ranges_need_a_uniform_grid(self) -> Recipe:
        if self.learned is not None and self.learned.learn_weight_range and self.grid is not GridKind.UNIFORM:
            raise ValueError(
                f"learned.learn_weight_range moves a uniform grid's ends; grid {self.grid.value} fixes its range's "
                "form: use grid uniform, or learned.learn_weight_scales"
            )
        return self

    @model_validator(mode="after")
    def _residual_needs_calibrated_activations(self) -> Recipe:
        if not self.a_residual:
            return self
        if self.a_bits is None:
            raise ValueError("a_residual quantizes activations: set a_bits (e.g. 8), or drop a_residual")
        if self.act_ranges not in (ActRanges.CALIB, ActRanges.AUTO, ActRanges.DYNAMIC):  # dynamic: below
            raise ValueError(
                f"a_residual calibrates its points on calibration data; act_ranges {self.act_ranges.value} is "
                "data-free: use act_ranges calib (or auto with calib data), or drop a_residual"
            )
        return self

    @model_validator(mode="after")
    def _dynamic_inputs_have_no_ranges(self) -> Recipe:
        if self.act_ranges is not ActRanges.DYNAMIC:
            return self
        if self.a_bits is None:
            raise ValueError(
                "act_ranges: dynamic quantizes layer inputs per token: set a_bits (e.g. 8), or drop act_ranges"
            )
        if self.a_residual:
            raise ValueError(
                "a_residual quantizes residual adds with static ranges from calibration data; act_ranges: "
                "dynamic has none: drop a_residual, or use act_ranges calib"
            )
        fields = (
            "a_observer",
            "a_percentile",
            "a_observer_samples",
        )  # by value: a full dump sets every field
        static = [f for f in fields if getattr(self, f) != type(self).model_fields[f].default]
        if static:
            raise ValueError(
                f"the fields {', '.join(static)} choose static activation ranges; act_ranges: dynamic computes "
                "each token's step at run time: drop them, or use a static act_ranges (calib, squant-noise, "
                "bn-noise)"
            )
        return self

    @model_validator(mode="after")
    def _exponent_needs_power_grid(self) -> Recipe:
        if self.power_exponent is not None and self.grid is not GridKind.POWER:
            raise ValueError(
                "power_exponent applies to the power grid only: set grid: power, or drop power_exponent"
            )
        if self.power_search is PowerSearch.OUTPUTS and (
            self.grid is not GridKind.POWER or self.power_exponent is not None
        ):
            raise ValueError(
                "power_search: outputs chooses the power grid's exponent: set grid: power and leave "
                "power_exponent unset, or drop power_search"
            )
        return self

    @property
    def searches_on_outputs(self) -> bool:
        """Whether the power exponent is searched on the output error (needs calibration data)."""
        return self.power_search is PowerSearch.OUTPUTS  # the validator ensures a power grid to search

    @field_validator("ignore")
    @classmethod
    def _valid_ignore_patterns(cls, v: list[str]) -> list[str]:
        for pattern in v:
            _check_pattern(pattern)
        return v

    @field_validator("overrides")
    @classmethod
    def _valid_override_patterns(cls, v: dict[str, LayerOverride]) -> dict[str, LayerOverride]:
        for pattern in v:
            _check_pattern(pattern)
        return v

    @field_validator("method", mode="before")
    @classmethod
    def _known_method(cls, v: Any) -> Any:
        if isinstance(v, str) and v not in {m.value for m in Method}:
            raise ValueError(str(unknown_name("method", v, [m.value for m in Method])))
        return v

    def weight_grid(self, w: torch.Tensor, bits: int, importance: torch.Tensor | None = None) -> Grid:
        """The grid this recipe gives weight `w` at `bits` bits (uniform or power, its ranges and granularity).

        `importance`: per-weight error factors for the power exponent search (``power_search: outputs``:
        the layer's input second moments, `postquant.calib.moments.input_moments`).
        """
        return fit_grid(
            w,
            bits,
            self.grid,
            self.granularity,
            power_exponent=self.power_exponent,
            importance=importance,
            symmetric=self.symmetric,
            range_method=self.w_range,
            group_size=self.group_size,
        )

    @classmethod
    def coerce(cls, recipe: Recipe | dict[str, Any] | str | Path | None = None, **changes: Any) -> Recipe:
        """A recipe from a Recipe, a dict of fields, or a YAML file path; `changes` override fields."""
        if recipe is None:
            data: dict[str, Any] = {}
        elif isinstance(recipe, Recipe):
            data = recipe.model_dump(exclude_unset=True)
        elif isinstance(recipe, dict):
            data = dict(recipe)
        elif isinstance(recipe, str | Path):
            data = _read_yaml(Path(recipe))
        else:
            raise RecipeError(f"a recipe is a Recipe, a dict or a YAML path, not {type(recipe).__name__}")
        data.update(changes)
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise RecipeError(_explain(exc)) from None

    def to_yaml(self, path: str | Path | None = None) -> str:
        """The recipe as YAML text; also written to `path` when given."""
        text = yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)
        if path is not None:
            try:
                write_text_atomic(Path(path), text)  # never a half-written recipe beside a finished run
            except OSError as exc:
                raise OutputError(f"cannot write the recipe to {path}: {exc.strerror}") from exc
        return text


def _gguf_fixed(kind: GridKind) -> dict[str, Any]:
    """The recipe fields a GGUF grid's format fixes."""
    fmt = block_format(kind)
    return {
        "w_bits": fmt.bits,
        "granularity": Granularity.GROUP,
        "group_size": GGUF_BLOCK,
        "symmetric": not fmt.has_min,
    }


def _check_pattern(pattern: str) -> None:
    """Raise `ValueError` for a ``re:`` layer pattern that is not a valid regular expression."""
    if pattern.startswith("re:"):
        try:
            re.compile(pattern[3:])
        except re.error as exc:
            raise ValueError(
                f"layer pattern {_cut(pattern, 80)!r} is not a valid regular expression ({exc})"
            ) from None


MAX_RECIPE_BYTES = 1 << 20  # a recipe is a few hundred bytes; anything near this is not one
_ECHO_CHARS = 80  # at most this much of an input is quoted back in an error message


def _short(value: Any) -> str:
    """``repr(value)``, cut to `_ECHO_CHARS` characters (error messages never echo a whole hostile input)."""
    if isinstance(value, list | tuple | dict | set) and len(value) > _ECHO_CHARS:
        return f"a {type(value).__name__} of {len(value)} items"
    return _cut(repr(value), _ECHO_CHARS)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


class _NoAliasLoader(yaml.SafeLoader):
    """A safe YAML loader that refuses anchors and aliases (``&a``/``*a``): a recipe never needs them, and
    nested aliases expand a few hundred bytes into gigabytes (the "billion laughs")."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise RecipeError(
                f"YAML anchors and aliases (*{event.anchor}) are not allowed in a recipe (line {event.start_mark.line + 1}); "
                "write the value out"
            )
        event = self.peek_event()
        if getattr(event, "anchor", None) is not None:
            raise RecipeError(
                f"YAML anchors and aliases (&{event.anchor}) are not allowed in a recipe (line {event.start_mark.line + 1}); "
                "write the value out"
            )
        return super().compose_node(parent, index)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise RecipeError(f"recipe file {path} does not exist")
    size = path.stat().st_size
    if size > MAX_RECIPE_BYTES:
        raise RecipeError(
            f"recipe file {path} is too large ({size} bytes, at most {MAX_RECIPE_BYTES}); is it a recipe?"
        )
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(
            f"recipe file {path} is not UTF-8 text (byte {exc.start}); save it as UTF-8"
        ) from None
    try:
        data = yaml.load(text, Loader=_NoAliasLoader)  # a SafeLoader without aliases
    except yaml.YAMLError as exc:
        raise RecipeError(f"recipe file {path} is not valid YAML: {_cut(str(exc), 300)}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"recipe file {path} must hold a mapping of fields, e.g. 'w_bits: 4'")
    return data


def _explain(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors(include_url=False)[:10]:
        where = ".".join(str(p) for p in err["loc"]) or "recipe"
        ctx = err.get("ctx", {})
        if "error" in ctx and isinstance(ctx["error"], Exception):
            message = str(ctx["error"])  # a validator's message may quote the input: keep it short
            lines.append(f"{where}: {_cut(message, 300)}")
        else:
            lines.append(f"{where}: {err['msg']} (got {_short(err.get('input'))})")
    return "invalid recipe: " + "; ".join(lines)
