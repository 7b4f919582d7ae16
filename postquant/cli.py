"""Command line: a thin layer that builds a recipe, calls the API and prints a table."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from postquant.errors import OutputError, PostquantError

app = typer.Typer(
    help="postquant: quantize trained PyTorch models to 2-8 bits after training.\n\n"
    "Examples:\n\n"
    "  postquant quantize resnet20-cifar10 --method rtn --w-bits 8 --a-bits 8\n\n"
    "  postquant quantize resnet20-cifar10 --method squant --w-bits 4 --a-bits 4 --json r.json\n\n"
    "  postquant quantize efficientnet-lite0 --method squant --w-bits 4 --limit 500\n\n"
    "  postquant eval minilm-l6",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(stderr=True)
out_console = Console()


def _check_writable_file(path: Path) -> None:
    """Fail before any work if `path` cannot be written (nothing is left behind)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=True):
            pass
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}; choose a writable location") from exc


def _check_writable_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".probe.", delete=True):
            pass
    except OSError as exc:
        raise OutputError(
            f"cannot write to directory {path}: {exc.strerror or exc}; choose a writable location"
        ) from exc


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to a temporary name next to `path`, then rename it into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )


def _fail(exc: PostquantError) -> None:
    console.print(f"[bold red]error:[/] {exc}")
    raise typer.Exit(code=2)


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


@app.command()
def quantize(
    model: Annotated[
        str, typer.Argument(help="zoo name (see `postquant models`) or module:factory[@weights]")
    ],
    method: Annotated[str, typer.Option(help="rtn | squant")] = "rtn",
    w_bits: Annotated[int, typer.Option(help="weight bits, 2..8")] = 4,
    a_bits: Annotated[int | None, typer.Option(help="activation bits, 2..8 (omit for weight-only)")] = None,
    recipe: Annotated[Path | None, typer.Option(help="YAML recipe; command-line options override it")] = None,
    granularity: Annotated[str | None, typer.Option(help="channel | tensor | group")] = None,
    squant_mode: Annotated[str | None, typer.Option(help="SQuant stages: e | ek | ec | ekc")] = None,
    act_ranges: Annotated[str | None, typer.Option(help="auto | calib | squant-noise")] = None,
    data: Annotated[Path | None, typer.Option(help="evaluation data (default: the model's own set)")] = None,
    calib: Annotated[
        Path | None, typer.Option(help="calibration data (default: the model's own set)")
    ] = None,
    calib_size: Annotated[int | None, typer.Option(help="number of calibration samples")] = None,
    limit: Annotated[int | None, typer.Option(help="evaluate on the first N samples only")] = None,
    seed: Annotated[int | None, typer.Option(help="random seed")] = None,
    out: Annotated[Path | None, typer.Option(help="directory for the recipe and results")] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="write the results as JSON here")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Quantize MODEL and print its metric beside FP32."""
    _setup_logging(verbose)
    try:
        _quantize(
            model,
            method,
            w_bits,
            a_bits,
            recipe,
            granularity,
            squant_mode,
            act_ranges,
            data,
            calib,
            calib_size,
            limit,
            seed,
            out,
            json_path,
        )
    except PostquantError as exc:
        _fail(exc)


def _quantize(
    model_name: str,
    method: str,
    w_bits: int,
    a_bits: int | None,
    recipe_path: Path | None,
    granularity: str | None,
    squant_mode: str | None,
    act_ranges: str | None,
    data: Path | None,
    calib_path: Path | None,
    calib_size: int | None,
    limit: int | None,
    seed: int | None,
    out: Path | None,
    json_path: Path | None,
) -> None:
    import postquant
    from postquant.eval import evaluate
    from postquant.recipe import Recipe
    from postquant.zoo import load_model

    changes: dict[str, Any] = {"method": method, "w_bits": w_bits, "a_bits": a_bits}
    for key, value in {
        "granularity": granularity,
        "squant_mode": squant_mode,
        "act_ranges": act_ranges,
        "calib_size": calib_size,
        "seed": seed,
    }.items():
        if value is not None:
            changes[key] = value
    rec = Recipe.coerce(recipe_path, **changes)  # validate before loading anything
    if json_path is not None:
        _check_writable_file(json_path)
    if out is not None:
        _check_writable_dir(out)

    zoo = load_model(model_name)
    needs_calib = (
        rec.a_bits is not None and rec.act_ranges.value in ("auto", "calib") and rec.method.value != "squant"
    )
    calib = zoo.calib_batches(calib_path, limit=rec.calib_size) if needs_calib or calib_path else None
    start = time.perf_counter()
    qmodel = postquant.quantize(zoo.model, rec, calib=calib, example_inputs=zoo.example_inputs)
    seconds = time.perf_counter() - start
    fp = evaluate(zoo.model, zoo, data, limit=limit)
    q = evaluate(qmodel, zoo, data, limit=limit)
    result = {
        "model": zoo.name,
        "method": rec.method.value,
        "w_bits": rec.w_bits,
        "a_bits": rec.a_bits,
        "metric": fp.metric,
        "fp": fp.value,
        "quantized": q.value,
        "quantize_seconds": seconds,
        "n_eval": q.n,
    }

    table = Table(
        title=f"{zoo.name}: {rec.method.value} W{rec.w_bits}" + (f"A{rec.a_bits}" if rec.a_bits else "")
    )
    for col in ("metric", "FP32", "quantized", "delta", "quantize time", "n"):
        table.add_column(col, justify="right")
    table.add_row(
        fp.metric, _fmt(fp.value), _fmt(q.value), f"{q.value - fp.value:+.2f}", f"{seconds:.3f} s", str(q.n)
    )
    out_console.print(table)
    if out is not None:
        rec.to_yaml(out / "recipe.yaml")
        write_atomic(out / "results.json", json.dumps(result, indent=2))
    if json_path is not None:
        write_atomic(json_path, json.dumps(result, indent=2))


@app.command("eval")
def eval_cmd(
    model: Annotated[str, typer.Argument(help="zoo name or module:factory[@weights]")],
    data: Annotated[Path | None, typer.Option(help="evaluation data (default: the model's own set)")] = None,
    limit: Annotated[int | None, typer.Option(help="evaluate on the first N samples only")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Evaluate the float MODEL on its evaluation set."""
    _setup_logging(verbose)
    try:
        from postquant.eval import evaluate
        from postquant.zoo import load_model

        zoo = load_model(model)
        res = evaluate(zoo.model, zoo, data, limit=limit)
        extra = ", ".join(f"{k} {v:.2f}" for k, v in res.extra.items())
        out_console.print(f"{zoo.name}: {res.metric} {res.value:.2f} ({extra}) on {res.n} samples")
    except PostquantError as exc:
        _fail(exc)


@app.command("models")
def models_cmd() -> None:
    """List the named models of the zoo."""
    from postquant.zoo import list_models

    for name in list_models():
        out_console.print(name)


if __name__ == "__main__":
    app()
