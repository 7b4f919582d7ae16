"""Command line: a thin layer that builds a recipe, calls the API and prints a table.

Heavy modules (torch, the API, the zoo) are imported inside the commands, so that ``postquant --help`` and
``postquant quantize --help`` answer at once.
"""

from __future__ import annotations

import json
import logging
import shlex
import tempfile
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from postquant import __version__
from postquant.choices import ActRanges, Granularity, GridKind, Importance, Method, PowerSearch, SquantMode
from postquant.errors import OutputError, PostquantError, RecipeError
from postquant.store.files import write_text_atomic
from postquant_lab.cli_options import (
    CompressedTensorsExportOptions,
    GgufExportOptions,
    Lab,
    MixedOptions,
    OnnxExportOptions,
    QuantizeOptions,
    StudyOptions,
)

if TYPE_CHECKING:
    import torch

CHECKPOINT_SUBDIR = "checkpoint"  # inside a run directory written by `quantize --out`

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

MODEL_HELP = "zoo name (see `postquant models`), module:factory\\[@weights], or timm:, torchvision:, hf: NAME"
DEVICES = ("auto", "cpu", "cuda", "cuda:N")


def _complete_device(incomplete: str) -> list[str]:
    """Shell completion of ``--device``: auto, cpu, cuda and cuda:0.. (the CUDA devices are not counted here)."""
    return [d for d in ("auto", "cpu", "cuda", "cuda:0", "cuda:1") if d.startswith(incomplete)]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"postquant {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool,
        typer.Option("--version", is_eager=True, callback=_version, help="print the version and exit"),
    ] = False,
) -> None:
    """postquant: quantize trained PyTorch models to 2-8 bits after training."""


def _check_writable_file(path: Path) -> None:
    """Fail before any work if `path` cannot be written (nothing is left behind)."""
    if path.is_dir():
        raise OutputError(f"cannot write {path}: it is a directory; give a file path, e.g. {path / 'r.json'}")
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


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )


def _fail(exc: PostquantError, verbose: bool = False) -> None:
    """Print `exc` as one line (its traceback first with --verbose) and exit with code 2."""
    if verbose:
        console.print("".join(traceback.format_exception(exc)).rstrip(), markup=False, highlight=False)
    message = " ".join(str(exc).split())  # one line, however the message was written
    console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True, highlight=False)
    raise typer.Exit(code=2)


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


@app.command()
def quantize(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help=MODEL_HELP)],
    method: Annotated[
        Method | None,
        typer.Option(
            help="rounding: adaround, brecq, qdrop, learned, learned-fast are learned rounding [default: rtn, or the recipe's]"
        ),
    ] = None,
    w_bits: Annotated[
        int | None, typer.Option(help="weight bits, 2..8 [default: 4, or the recipe's]")
    ] = None,
    a_bits: Annotated[
        int | None, typer.Option(help="activation bits, 2..8 (omit for weight-only, or the recipe's)")
    ] = None,
    recipe: Annotated[
        Path | None, typer.Option(help="YAML recipe; only the options you type override its fields")
    ] = None,
    granularity: Annotated[Granularity | None, typer.Option(help="weights sharing one step size")] = None,
    group_size: Annotated[
        int | None,
        typer.Option(min=1, help="inputs per group of one step size (implies --granularity group)"),
    ] = None,
    squant_mode: Annotated[
        SquantMode | None, typer.Option(help="SQuant stages: e (nearest), k (kernel), c (channel)")
    ] = None,
    act_ranges: Annotated[
        ActRanges | None,
        typer.Option(
            help="activation ranges: auto (calib with calibration data, else data-free: bn-noise for models "
            "with BatchNorm, squant-noise otherwise), calib (observers over calibration data), squant-noise "
            "(SQuant's uniform-noise rule), bn-noise (noise matched to the BatchNorm statistics), dynamic (no ranges: "
            "each token of a Linear's input quantized at run time with its own step, as LLM runtimes do)"
        ),
    ] = None,
    grid: Annotated[GridKind | None, typer.Option(help="weight grid (power: non-uniform)")] = None,
    power_exponent: Annotated[
        float | None, typer.Option(help="power grid exponent in (0, 1] (omit to search it per layer)")
    ] = None,
    power_search: Annotated[
        PowerSearch | None,
        typer.Option(help="power exponent search error (outputs: needs calibration data)"),
    ] = None,
    data: Annotated[Path | None, typer.Option(help="evaluation data (default: the model's own set)")] = None,
    calib: Annotated[
        Path | None, typer.Option(help="calibration data (default: the model's own set)")
    ] = None,
    calib_size: Annotated[int | None, typer.Option(min=1, help="number of calibration samples")] = None,
    limit: Annotated[
        int | None, typer.Option(min=1, help="evaluate on N samples spread evenly over the set")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="random seed")] = None,
    iters: Annotated[
        int | None,
        typer.Option(min=1, help="learned rounding: optimisation steps per unit (overrides the preset)"),
    ] = None,
    checkpoint_dir: Annotated[
        Path | None,
        typer.Option(
            help="learned rounding and mixed-precision importance: save finished work here and resume from it"
        ),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="directory for the recipe and results")] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="write the results as JSON here")] = None,
    report: Annotated[bool, typer.Option(help="with --out: also write an HTML report")] = False,
    overwrite: Annotated[
        bool, typer.Option(help="with --out: replace a previous run's results there")
    ] = False,
    w_bits_budget: Annotated[
        float | None, typer.Option(help="mixed precision: average weight bits per layer, e.g. 3.0")
    ] = None,
    size_budget: Annotated[str | None, typer.Option(help="mixed precision: model size, e.g. 2MB")] = None,
    importance: Annotated[
        Importance | None, typer.Option(help="mixed precision: how a layer's damage is predicted")
    ] = None,
    bit_choices: Annotated[
        str | None, typer.Option(help="mixed precision: allowed weight bits, e.g. 2,3,4,6,8")
    ] = None,
    device: Annotated[
        str,
        typer.Option(
            metavar="[" + "|".join(DEVICES) + "]",
            autocompletion=_complete_device,
            help="where the model and data run (auto: CUDA if available)",
        ),
    ] = "auto",
    seqlen: Annotated[
        int | None, typer.Option(min=2, help="causal LMs: tokens per calibration and evaluation window")
    ] = None,
    sequential: Annotated[
        bool | None,
        typer.Option(
            "--sequential/--no-sequential",
            help="causal LMs: one decoder layer at a time in bounded memory [default: when the recipe allows]",
            show_default=False,
        ),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Quantize MODEL and print its metric beside FP32 (--out DIR also saves the packed checkpoint)."""
    _setup_logging(verbose)
    options = QuantizeOptions(
        model=model,
        recipe_file=recipe,
        method=method,
        w_bits=w_bits,
        a_bits=a_bits,
        granularity=granularity,
        group_size=group_size,
        squant_mode=squant_mode,
        act_ranges=act_ranges,
        calib_size=calib_size,
        seed=seed,
        grid=grid,
        power_exponent=power_exponent,
        power_search=power_search,
        mixed=MixedOptions(w_bits_budget, size_budget, importance, bit_choices),
        iters=iters,
        checkpoint_dir=checkpoint_dir,
        data=data,
        calib=calib,
        limit=limit,
        out=out,
        json_path=json_path,
        report=report,
        overwrite=overwrite,
        device=device,
        seqlen=seqlen,
        sequential=sequential,
    )
    try:
        _join_ranks()
        _quantize(options, _lab(ctx))
    except PostquantError as exc:
        _fail(exc, verbose)
    finally:
        _leave_ranks()


def _join_ranks() -> None:
    """Under ``torchrun`` (WORLD_SIZE > 1), join its process group: `quantize` then splits the work."""
    from postquant.distributed import init_from_env

    init_from_env()


def _leave_ranks() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:  # every rank done before any tears the group down (gloo may abort a rank whose peer left)
            dist.barrier()
        except Exception as exc:  # a dead peer: leave anyway, the run's own error is already out
            logging.getLogger(__name__).debug("no barrier before leaving the process group: %s", exc)
        dist.destroy_process_group()


def _sequential(options: QuantizeOptions, zoo: Any, rec: Any) -> bool:
    """Whether to quantize block by block; applies ``--seqlen`` to a causal LM.

    Raises:
        RecipeError: ``--seqlen`` or ``--sequential`` for a model that is not a causal LM, or ``--sequential``
            with a recipe the block path does not run (it says which fields).
    """
    from postquant.blockwise import check_block_recipe
    from postquant.errors import RecipeError

    if zoo.task != "lm":
        if options.seqlen is not None or options.sequential:
            raise RecipeError(
                f"--seqlen and --sequential apply to causal LMs; {zoo.name} is a {zoo.task} model: drop them"
            )
        return False
    if options.seqlen is not None:
        zoo.seqlen = zoo.calib_seqlen = options.seqlen
    if options.sequential is False:
        return False
    try:
        check_block_recipe(rec)
    except RecipeError:
        if options.sequential:
            raise
        return False
    return True


def _lab(ctx: typer.Context) -> Lab:
    """The `Lab` passed as the context object (``app(obj=Lab(...))``), else the lab's own functions."""
    return ctx.obj if isinstance(ctx.obj, Lab) else Lab()


def resolve_device(spec: str) -> torch.device:
    """The device of ``--device``: ``auto`` (CUDA when available, else the CPU), ``cpu``, ``cuda``, ``cuda:N``.

    Raises:
        DeviceError: an unknown device, or CUDA asked for where it is not available.
    """
    import torch

    from postquant.errors import DeviceError

    spec = spec.strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise DeviceError(f"unknown device {spec!r}: use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(
                f"--device {spec}: CUDA is not available on this machine (torch {torch.__version__}, "
                f"built with CUDA {torch.version.cuda}); use --device cpu or auto"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(
                f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                f"cuda:0 to cuda:{torch.cuda.device_count() - 1}"
            )
    return device


def _check_outputs(options: QuantizeOptions) -> None:
    """Fail before any work when an output of `options` cannot be written or would replace another run's."""
    out = options.out
    if options.report and out is None:
        raise RecipeError("--report writes OUT/report.html: add --out DIR")
    if options.json_path is not None:
        _check_writable_file(options.json_path)
    if out is not None:
        from postquant.io.checkpoint import check_save_target

        _check_writable_dir(out)
        check_save_target(out / CHECKPOINT_SUBDIR)  # save replaces only a checkpoint it wrote
        if (out / "results.json").exists() and not options.overwrite:
            raise OutputError(
                f"{out} holds a previous run (results.json); pass --overwrite to replace it, or choose another --out"
            )


def _quantize(options: QuantizeOptions, lab: Lab) -> None:
    """Run ``postquant quantize``: check the recipe and the outputs, load, quantize, score, print, save."""
    import postquant
    from postquant.calib.data import move_batch
    from postquant.pipeline import Need
    from postquant.recipe import Method

    device = resolve_device(options.device)
    rec = options.build_recipe()  # validate before loading anything
    _check_outputs(options)
    out = options.out

    zoo = lab.model_loader()(options.model)
    sequential = _sequential(options, zoo, rec)
    # The stages say what they need; the command adds one policy: SQuant stays data-free unless asked
    # (data-free activation ranges where calibration data is only useful), except for sentence models.
    needs = postquant.requirements(rec, optional_data=not (rec.method is Method.SQUANT and zoo.task != "sts"))
    calib_limit = needs.calib_size or rec.calib_size
    calib = (
        zoo.calib_batches(options.calib, limit=calib_limit)
        if needs.calib is not Need.NONE or options.calib
        else None
    )
    # the model and its data on the device (quantize keeps the model's device)
    zoo.model.to(device)
    zoo.example_inputs = move_batch(zoo.example_inputs, device)
    calib = move_batch(calib, device) if calib is not None else None
    start = time.perf_counter()
    if sequential:
        qmodel = postquant.quantize_blocks(zoo.model, rec, calib)
    else:
        qmodel = lab.quantizer()(zoo.model, rec, calib=calib, example_inputs=zoo.example_inputs)
    seconds = time.perf_counter() - start
    from postquant.distributed import is_main

    if not is_main():  # every rank holds the same model: rank 0 alone evaluates, prints and writes
        return
    fp, q = _score(zoo, qmodel, options.data, options.limit)
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
        title=f"{zoo.name}: {rec.method.value} {_w_label(qmodel, rec.w_bits)}"
        + (f"A{rec.a_bits}" if rec.a_bits else "")
    )
    for col in ("metric", "FP32", "quantized", "delta", "quantize time", "n"):
        table.add_column(col, justify="right")
    table.add_row(
        fp.metric, _fmt(fp.value), _fmt(q.value), f"{q.value - fp.value:+.2f}", f"{seconds:.3f} s", str(q.n)
    )
    out_console.print(table)
    allocation = postquant.result(qmodel).mixed
    if allocation is not None:
        from postquant.mixed.report import allocation_table, write_allocation

        # per-layer bits: w_bits is no single number (the recipe's default would mislead)
        result |= {"w_bits": None, "avg_w_bits": allocation.avg_w_bits, "size_bytes": allocation.size_bytes}
        out_console.print(allocation_table(allocation))
        if out is not None:
            write_allocation(allocation, out)
    if out is not None:
        from postquant.io import checkpoint_size, float_size, save

        save(qmodel, out / CHECKPOINT_SUBDIR, model_name=options.model)
        result["checkpoint_bytes"] = checkpoint_size(out / CHECKPOINT_SUBDIR)
        result["fp32_bytes"] = float_size(zoo.model)
        out_console.print(
            f"saved {out / CHECKPOINT_SUBDIR}: {result['checkpoint_bytes'] / 1e6:.2f} MB "
            f"(FP32 {result['fp32_bytes'] / 1e6:.2f} MB, {result['fp32_bytes'] / result['checkpoint_bytes']:.1f}x smaller)"
        )
        rec.to_yaml(out / "recipe.yaml")
        write_text_atomic(out / "results.json", json.dumps(result, indent=2))
        if options.report:
            from postquant.io import write_report

            path = write_report(out, qmodel, zoo.model, [result], zoo.example_inputs)
            out_console.print(f"report: {path}")
    if options.json_path is not None:
        write_text_atomic(options.json_path, json.dumps(result, indent=2))


def _w_label(qmodel: Any, w_bits: int) -> str:
    """``W4``, or ``W2.98(mixed)`` (average weight bits) for a mixed-precision model."""
    import postquant

    allocation = postquant.result(qmodel).mixed
    return f"W{w_bits}" if allocation is None else f"W{allocation.avg_w_bits:.2f}(mixed)"


def _score(zoo: Any, qmodel: Any, data: Path | None, limit: int | None) -> tuple[Any, Any]:
    """FP32 and quantized metric on the evaluation set; without one, label-free fidelity on noise."""
    import torch

    from postquant.errors import DataError
    from postquant.eval import fidelity
    from postquant_lab.evaluate import EvalResult, evaluate

    if zoo.task == "lm":  # perplexity on the first `limit` windows of the text (default: the model's file)
        return evaluate(zoo.model, zoo, data, limit=limit), evaluate(qmodel, zoo, data, limit=limit)
    try:
        dataset = zoo.eval_batches(data, limit=limit)
    except DataError as exc:
        if data is not None or zoo.input_shape is None:
            raise
        console.print(
            f"[yellow]warning:[/] {exc}\nReporting label-free fidelity instead: top-1 agreement with FP32 "
            "on 64 seeded Gaussian inputs (not an accuracy)."
        )
        gen = torch.Generator().manual_seed(0)
        batches = list(torch.randn(64, *zoo.input_shape, generator=gen).split(16))
        fid = fidelity(zoo.model, qmodel, batches)
        extra = {"sqnr_db": fid["sqnr_db"]}
        return (
            EvalResult("top1_agreement", 100.0, 64, {}),
            EvalResult("top1_agreement", fid["top1_agreement"], 64, extra),
        )
    return evaluate(zoo.model, zoo, data=dataset), evaluate(qmodel, zoo, data=dataset)


@app.command("eval")
def eval_cmd(
    model: Annotated[str, typer.Argument(help=MODEL_HELP)],
    data: Annotated[Path | None, typer.Option(help="evaluation data (default: the model's own set)")] = None,
    limit: Annotated[
        int | None, typer.Option(min=1, help="evaluate on N samples spread evenly over the set")
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Evaluate the float MODEL on its evaluation set."""
    _setup_logging(verbose)
    try:
        from postquant_lab.evaluate import evaluate
        from postquant_lab.zoo import load_model

        zoo = load_model(model)
        res = evaluate(zoo.model, zoo, data, limit=limit)
        extra = ", ".join(f"{k} {v:.2f}" for k, v in res.extra.items())
        out_console.print(f"{zoo.name}: {res.metric} {res.value:.2f} ({extra}) on {res.n} samples")
    except PostquantError as exc:
        _fail(exc, verbose)


export_app = typer.Typer(help="Export a saved quantized model.", no_args_is_help=True)
app.add_typer(export_app, name="export")


def _checkpoint_dir(run_dir: Path) -> Path:
    """A run directory written by `quantize --out`, or a checkpoint directory itself."""
    sub = run_dir / CHECKPOINT_SUBDIR
    return sub if (sub / "manifest.json").exists() else run_dir


TRUST_CODE_HELP = (
    "build a model the checkpoint names as module:factory (or a hub name): runs code the file names; "
    "only for checkpoints from a trusted source"
)


def _load_run(run_dir: Path, trust_code: bool) -> tuple[Any, Any]:
    """The quantized model of a run directory and the zoo model its manifest names (built once).

    A name that is not a built-in zoo model is built only with ``--trust-code`` (it imports and runs code).
    """
    from postquant.io import load
    from postquant.io.checkpoint import saved_model_name
    from postquant_lab.checkpoint import zoo_model_for

    directory = _checkpoint_dir(run_dir)
    zoo = zoo_model_for(saved_model_name(directory), trust_code=trust_code)
    return load(directory, zoo.model), zoo


@export_app.command("onnx")
def export_onnx_cmd(
    run_dir: Annotated[Path, typer.Argument(help="directory written by `postquant quantize ... --out DIR`")],
    output: Annotated[Path, typer.Option("-o", "--output", help="the .onnx file to write")] = Path(
        "model.onnx"
    ),
    verify: Annotated[
        int, typer.Option(min=0, help="check agreement with PyTorch on N evaluation samples (0: none)")
    ] = 256,
    trust_code: Annotated[bool, typer.Option(help=TRUST_CODE_HELP)] = False,
    full_integer: Annotated[
        bool,
        typer.Option(
            help="also quantize residual adds and pooling so onnxruntime runs integer kernels end to end "
            "(ranges from 256 calibration samples; docs/export.md)"
        ),
    ] = False,
    external_data: Annotated[
        bool | None,
        typer.Option(
            "--external-data/--no-external-data",
            help="write the tensors to OUTPUT.data beside the .onnx (default: only above protobuf's 2 GB)",
            show_default=False,
        ),
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing .onnx (and its .onnx.data)")] = False,
    opset: Annotated[
        int | None,
        typer.Option(min=13, help="ONNX opset (default: 21 when a layer stores int4 weights, else 17)"),
    ] = None,
    int4: Annotated[
        str,
        typer.Option(
            help="layers of <= 4 bits stored as int4 (opset 21): weight-only (layers without an input "
            "quantizer), all, none"
        ),
    ] = "weight-only",
    int8_weights: Annotated[
        str,
        typer.Option(
            help="8-bit codes outside [-64, 63]: portable (uint8, exact on every CPU) or signed (int8, the fast "
            "u8 x s8 kernels, for a CPU with VNNI; docs/export.md)"
        ),
    ] = "portable",
    exporter: Annotated[
        str, typer.Option(help="torch's ONNX exporter: torchscript or dynamo")
    ] = "torchscript",
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Export a saved quantized model to ONNX (QuantizeLinear/DequantizeLinear), checked in onnxruntime."""
    _setup_logging(verbose)
    options = OnnxExportOptions(
        run_dir,
        output,
        verify,
        trust_code,
        full_integer,
        external_data,
        overwrite,
        opset,
        int4,
        exporter,
        int8_weights,
    )
    try:
        _export_onnx(options)
    except PostquantError as exc:
        _fail(exc, verbose)


def _export_onnx(options: OnnxExportOptions) -> None:
    from postquant.errors import DataError
    from postquant.io import export_onnx
    from postquant.io.onnx.export import Exporter
    from postquant.io.onnx.files import check_target
    from postquant.io.onnx.params import Int4Weights, Int8Weights
    from postquant_lab.zoo.datasets import SentencePair

    for flag, value, kind in (
        ("--int4", options.int4, Int4Weights),
        ("--int8-weights", options.int8_weights, Int8Weights),
        ("--exporter", options.exporter, Exporter),
    ):
        if value not in {m.value for m in kind}:
            raise RecipeError(f"{flag} must be one of {', '.join(m.value for m in kind)}, not {value!r}")
    output, verify = options.output, options.verify
    _check_writable_file(output)
    check_target(output, overwrite=options.overwrite, external_data=options.external_data)
    qmodel, zoo = _load_run(options.run_dir, options.trust_code)
    try:
        batches = [x for x, _ in zoo.eval_batches(limit=verify, batch_size=32)] if verify else None
        if batches and isinstance(batches[0], SentencePair):  # sentence pairs: the model takes one side
            batches = [pair.first for pair in batches]
    except DataError as exc:
        console.print(f"[yellow]warning:[/] {exc}; verifying on the example inputs only")
        batches = [zoo.example_inputs]
    calib = None
    if options.full_integer:
        try:
            calib = zoo.calib_batches(limit=256)
        except DataError as exc:
            console.print(f"[yellow]warning:[/] {exc}; the new ranges come from the example inputs only")
    info = export_onnx(
        qmodel,
        zoo.example_inputs,
        output,
        verify_batches=batches,
        full_integer=options.full_integer,
        calib_batches=calib,
        external_data=options.external_data,
        overwrite=options.overwrite,
        opset=options.opset,
        int4=options.int4,
        int8_weights=options.int8_weights,
        exporter=options.exporter,
    )
    top1, sqnr, diff = info.get("top1_agreement"), info.get("sqnr_db"), info.get("max_abs_diff")
    data = f" and {info['external_data']}" if info.get("external_data") else ""
    size = f"wrote {output}{data} ({info['bytes'] / 1e6:.2f} MB, opset {info['opset']})"
    if sqnr is None:  # --verify 0: not compared
        out_console.print(f"{size}, not checked in onnxruntime (--verify 0)")
        return
    agreement = f"top-1 agreement {top1:.2f} %, " if top1 is not None and top1 == top1 else ""
    out_console.print(
        f"{size}: against the PyTorch simulation {agreement}SQNR {sqnr:.1f} dB, "
        f"max |diff| {diff:.3g}; integer kernels: {info.get('integer_kernels')}"
    )


@export_app.command("compressed-tensors")
def export_compressed_tensors_cmd(
    run_dir: Annotated[Path, typer.Argument(help="directory written by `postquant quantize ... --out DIR`")],
    output: Annotated[Path, typer.Option("-o", "--output", help="the directory to write")],
    source: Annotated[
        Path | None,
        typer.Option(help="the float model's directory: its tokenizer, chat template and generation config"),
    ] = None,
    verify_text: Annotated[
        Path | None,
        typer.Option(help="check the export in transformers on windows of this text (needs --source)"),
    ] = None,
    verify_windows: Annotated[int, typer.Option(min=1, help="windows of --verify-text to compare on")] = 4,
    window: Annotated[int, typer.Option(min=2, help="tokens per window")] = 256,
    overwrite: Annotated[bool, typer.Option(help="replace an existing export directory")] = False,
    trust_code: Annotated[bool, typer.Option(help=TRUST_CODE_HELP)] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Export a saved quantized Hugging Face model as a compressed-tensors checkpoint (transformers, vLLM)."""
    _setup_logging(verbose)
    options = CompressedTensorsExportOptions(
        run_dir, output, source, verify_text, verify_windows, window, overwrite, trust_code
    )
    try:
        _export_compressed_tensors(options)
    except PostquantError as exc:
        _fail(exc, verbose)


def _export_compressed_tensors(options: CompressedTensorsExportOptions) -> None:
    from postquant.errors import DataError
    from postquant.io import export_compressed_tensors

    source, output = options.source, options.output
    inputs = None
    if options.verify_text is not None:
        if source is None:
            raise DataError("--verify-text is tokenized with the tokenizer of --source: pass --source DIR")
        inputs = _text_windows(source, options.verify_text, options.verify_windows, options.window)
    qmodel, _ = _load_run(options.run_dir, options.trust_code)
    done = export_compressed_tensors(
        qmodel,
        output,
        source=str(source) if source else None,
        overwrite=options.overwrite,
        verify_inputs=inputs,
    )
    check = (
        f"; in transformers: max |diff| {done.check.max_abs_diff:.3g}, top-1 agreement "
        f"{done.check.top1_agreement:.2f} %"
        if done.check is not None
        else "; not checked in transformers (pass --source and --verify-text)"
    )
    out_console.print(
        f"wrote {output} ({done.bytes / 1e6:.2f} MB, weights {done.compression:.2f}x smaller than float, "
        f"{len(done.groups)} config groups){check}"
    )


def _text_windows(source: Path, text_file: Path, n: int, length: int) -> list[Any]:
    """The first `n` windows of `length` tokens of `text_file`, tokenized by `source`'s tokenizer."""
    import torch
    from transformers import AutoTokenizer

    from postquant.errors import DataError

    if not text_file.is_file():
        raise DataError(f"{text_file} is not a file")
    ids = AutoTokenizer.from_pretrained(str(source))(text_file.read_text(encoding="utf-8"))["input_ids"]
    if len(ids) < length:
        raise DataError(
            f"{text_file} holds {len(ids)} tokens, fewer than one window of {length}: use --window"
        )
    count = min(n, len(ids) // length)
    return [torch.tensor(ids[i * length : (i + 1) * length]).unsqueeze(0) for i in range(count)]


@export_app.command("gguf")
def export_gguf_cmd(
    run_dir: Annotated[Path, typer.Argument(help="directory written by `postquant quantize ... --out DIR`")],
    output: Annotated[Path, typer.Option("-o", "--output", help="the .gguf file to write")],
    type_: Annotated[
        str | None,
        typer.Option("--type", help="the GGUF type the quantized layers must have: q4_0, q4_1 or q8_0"),
    ] = None,
    source_gguf: Annotated[
        Path | None, typer.Option(help="a GGUF of the same model: its tokenizer and metadata are copied")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing file")] = False,
    trust_code: Annotated[bool, typer.Option(help=TRUST_CODE_HELP)] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Export a saved Llama quantized on a GGUF grid (grid: gguf-q4_0 | gguf-q4_1 | gguf-q8_0) for llama.cpp;
    the file is read back and checked against postquant's weights before it is renamed into place."""
    _setup_logging(verbose)
    try:
        _export_gguf(GgufExportOptions(run_dir, output, type_, source_gguf, overwrite, trust_code))
    except PostquantError as exc:
        _fail(exc, verbose)


def _export_gguf(options: GgufExportOptions) -> None:
    from postquant.io import export_gguf

    qmodel, _ = _load_run(options.run_dir, options.trust_code)
    done = export_gguf(
        qmodel,
        options.output,
        source_gguf=options.source_gguf,
        overwrite=options.overwrite,
        expect_type=options.type_,
        verify=True,
    )
    out_console.print(
        f"wrote {options.output} ({done.file_bytes / 1e6:.2f} MB, {done.file_type}); "
        f"{done.verified_tensors} tensors read back equal to postquant's"
    )


@app.command("report")
def report_cmd(
    run_dir: Annotated[Path, typer.Argument(help="directory written by `postquant quantize ... --out DIR`")],
    trust_code: Annotated[bool, typer.Option(help=TRUST_CODE_HELP)] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Write RUN_DIR/report.html: per-layer SQNR, bits per layer, accuracy vs bits, the recipe."""
    _setup_logging(verbose)
    try:
        from postquant.io import write_report

        qmodel, zoo = _load_run(run_dir, trust_code)
        results_file = run_dir / "results.json"
        results = [json.loads(results_file.read_text())] if results_file.exists() else []
        path = write_report(run_dir, qmodel, zoo.model, results, zoo.example_inputs)
        out_console.print(f"report: {path}")
    except PostquantError as exc:
        _fail(exc, verbose)


@app.command("models")
def models_cmd() -> None:
    """List the named models of the zoo: task, data, and whether they are available here."""
    from postquant.paths import ENV_VAR, shared_dir
    from postquant_lab.zoo.builtin import BUILTIN_INFO

    out_console.print(f"Zoo models (shared files from {ENV_VAR}={shared_dir()}):", markup=False)
    for info in BUILTIN_INFO:
        missing = info.missing()
        status = "available here" if not missing else "not available here, missing " + "; ".join(missing)
        out_console.print(
            f"  {info.name:<19} {info.task}; data: {info.data}; {status}",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
    out_console.print(
        "Any other model: module.path:factory or module.path:factory@weights.pt (factory() returns an "
        "nn.Module), timm:<arch>, torchvision:<arch>, hf:<hub id or local folder>, gguf:<file.gguf> (a causal "
        "LM and its tokenizer from a GGUF file).",
        markup=False,
        highlight=False,
    )


# ----------------------------------------------------------------------------------------------- study


@app.command("study")
def study_cmd(
    axis: Annotated[str, typer.Argument(help="an axis (see `postquant study list`), 'all', or 'list'")],
    models: Annotated[
        list[str] | None, typer.Argument(help="zoo model (one for an axis; 'all': default list of the issue)")
    ] = None,
    bits: Annotated[
        str | None,
        typer.Option(help="W4A4 or W3 (default: the model's first study bits; 'all': each model's)"),
    ] = None,
    seeds: Annotated[
        int | None, typer.Option(min=1, help="seeds 0..N-1 per variant (default: per model, 2-3)")
    ] = None,
    iters: Annotated[
        int | None, typer.Option(min=1, help="steps per unit of the study base (default: per model)")
    ] = None,
    calib_size: Annotated[
        int | None, typer.Option(min=1, help="calibration samples of the study base")
    ] = None,
    limit: Annotated[
        int | None, typer.Option(min=1, help="evaluate on N samples spread over the set")
    ] = None,
    out: Annotated[Path, typer.Option(help="directory of results.json, tables, plots, STUDY.md")] = Path(
        "study"
    ),
    variants: Annotated[
        str | None, typer.Option(help="comma-separated variant labels (baseline always)")
    ] = None,
    axes: Annotated[
        str | None, typer.Option(help="'all': comma-separated axes (default: every axis)")
    ] = None,
    max_minutes: Annotated[
        float | None, typer.Option(help="start no new run after this many minutes (resume later)")
    ] = None,
    run: Annotated[bool, typer.Option(help="--no-run: report from cached results only")] = True,
    threads: Annotated[int, typer.Option(min=1, help="torch threads")] = 1,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Measure one axis of learned rounding over seeds (table + plot), or every axis into STUDY.md.

    Examples: `postquant study list`; `postquant study selection resnet20-cifar10 --bits W4A4 --seeds 2`;
    `postquant study all --out study` (resumable: finished runs are cached in OUT/results.json).
    Start the same command once per core to share the work: each process claims the runs it starts; under
    `torchrun --nproc-per-node N -m postquant study ...` the ranks split the runs through the process group.
    """
    _setup_logging(verbose)
    options = StudyOptions(
        axis=axis,
        models=tuple(models or ()),
        bits=bits,
        seeds=seeds,
        iters=iters,
        calib_size=calib_size,
        limit=limit,
        out=out,
        variants=variants,
        axes=axes,
        max_minutes=max_minutes,
        run=run,
        threads=threads,
    )
    try:
        if axis != "list":
            _join_ranks()
        _study(options)
    except PostquantError as exc:
        _fail(exc, verbose)
    finally:
        _leave_ranks()


def _study(options: StudyOptions) -> None:
    """Run ``postquant study``: list the axes, measure one axis, or every axis into STUDY.md."""
    from postquant_lab.study import (
        AXES,
        DEFAULT_BITS,
        StudyRunner,
        default_settings,
        get_axis,
        study_all,
        study_axis,
    )

    axis_name, models, bits, out = options.axis, list(options.models), options.bits, options.out
    iters, calib_size, limit, seeds = options.iters, options.calib_size, options.limit, options.seeds
    if axis_name == "list":
        for ax in AXES:
            labels = ", ".join(f"{v.label}*" if v.label == ax.baseline else v.label for v in ax.variants)
            out_console.print(f"{ax.name:<13} {labels}", markup=False, highlight=False, soft_wrap=True)
        out_console.print("(* = baseline)", markup=False)
        return
    import torch

    torch.set_num_threads(options.threads)
    if axis_name == "all":
        chosen = [get_axis(a.strip()) for a in options.axes.split(",")] if options.axes else list(AXES)
        settings = [
            default_settings(m, b, iters, calib_size, limit, seeds)
            for m in models or list(DEFAULT_BITS)
            for b in ([bits] if bits else DEFAULT_BITS.get(m, ["W4A4"]))
        ]
    else:
        ax = get_axis(axis_name)  # unknown axis: a typed error with suggestions
        if len(models) != 1:
            raise RecipeError(f"`postquant study {axis_name}` needs exactly one MODEL, e.g. resnet20-cifar10")
        model = models[0]
        settings = [
            default_settings(
                model, bits or DEFAULT_BITS.get(model, ["W4A4"])[0], iters, calib_size, limit, seeds
            )
        ]
    _check_writable_dir(out)
    max_seconds = None if options.max_minutes is None else 60 * options.max_minutes
    runner = StudyRunner(out, max_seconds=max_seconds)
    command = _study_command(axis_name, models, options.run, **options.command_options())
    from postquant.distributed import is_main

    if axis_name == "all":
        path = study_all(settings, chosen, None, runner, command, run=options.run)
        if is_main():  # under torchrun, rank 0 alone writes and prints
            out_console.print(f"wrote {path}")
        return
    seed_list = list(range(settings[0].seeds))
    labels = options.variant_labels()
    report = study_axis(settings[0], ax, seed_list, runner, labels, run=options.run, command=command)
    if not is_main():
        return
    typer.echo(report.section + "\n" + report.summary)
    if report.missing:
        console.print(
            f"[yellow]{len(report.missing)} runs missing[/] (run the same command again to add them)"
        )


def _study_command(axis: str, models: list[str], run: bool, **options: Any) -> str | None:
    """The command line that reproduces a study run (None for report-only runs, which add no result)."""
    if not run:
        return None
    words = ["postquant", "study", axis, *models]
    for key, value in options.items():
        if value is not None:
            words += [f"--{key.replace('_', '-')}", str(value)]
    return " ".join(shlex.quote(w) for w in words)


if __name__ == "__main__":
    app()
