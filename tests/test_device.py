"""Every stage runs on the device (and in the float dtype) of the model's parameters, wherever the
calibration batches come from; the quantized model stays where the model was.

The `device` fixture runs each case on the CPU, and on CUDA where there is one (``pytest -m cuda``). Without a
GPU the float64 stand-in catches the same class of bug: a tensor created without the device/dtype of its
inputs shows up as a float32 tensor in a float64 model.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import postquant
from postquant.calib.data import move_batch
from postquant.eval import fidelity
from postquant.eval.run import model_placement, run_model
from postquant_lab.evaluate import evaluate
from tests.conftest import TinyResNet, randomize_bn

pytestmark = pytest.mark.usefixtures("one_thread")

LEARNED = {"iters": 3, "batch_size": 8, "progress": False}
RECIPES = {  # each stage of the pipeline, at tiny sizes
    "rtn": {"method": "rtn", "w_bits": 4, "a_bits": 4},
    "squant": {"method": "squant", "w_bits": 4, "a_bits": 4},
    "learned": {"method": "learned", "w_bits": 4, "a_bits": 4, "learned": LEARNED},
    "qdrop": {"method": "qdrop", "w_bits": 4, "a_bits": 4, "learned": LEARNED},
    "learned-fisher": {
        "method": "learned",
        "w_bits": 4,
        "a_bits": 4,
        "learned": {**LEARNED, "loss": "fisher"},
    },
    "learned-output": {
        "method": "learned",
        "w_bits": 4,
        "a_bits": 4,
        "learned": {**LEARNED, "loss": "output"},
    },
    "synthetic": {
        "method": "learned",
        "w_bits": 4,
        "a_bits": 4,
        "calib_size": 16,
        "learned": {**LEARNED, "calib_source": "synthetic", "synthetic_steps": 2},
    },
    "mixed-loss": {"method": "rtn", "a_bits": 8, "mixed": {"w_bits_budget": 5.0, "importance": "loss"}},
    "mixed-fisher": {"method": "rtn", "a_bits": 8, "mixed": {"w_bits_budget": 5.0, "importance": "fisher"}},
    "power-outputs": {"method": "rtn", "w_bits": 4, "grid": "power", "power_search": "outputs"},
}
OBSERVERS = {  # activation calibration with each observer kind, and the data-free rules
    f"observer-{kind}": {"method": "rtn", "w_bits": 8, "a_bits": 4, "act_ranges": "calib", "a_observer": kind}
    for kind in ("minmax", "percentile", "mse", "std")
} | {
    "bn-noise": {"method": "rtn", "w_bits": 8, "a_bits": 4, "act_ranges": "bn-noise"},
    "squant-noise": {"method": "rtn", "w_bits": 8, "a_bits": 4, "act_ranges": "squant-noise"},
}
DATA_FREE = {"bn-noise", "squant-noise"}


def tiny_resnet(dtype: torch.dtype = torch.float32) -> TinyResNet:
    torch.manual_seed(0)
    model = TinyResNet()
    randomize_bn(model.bn1)
    return model.eval().to(dtype)


def calib_images(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(1)).to(dtype)


def quantize(
    name: str, device: torch.device, dtype: torch.dtype = torch.float32
) -> tuple[nn.Module, nn.Module]:
    """(float model on `device`, its quantized copy by recipe `name`); calibration batches stay on the CPU."""
    recipes = RECIPES | OBSERVERS
    model = tiny_resnet(dtype).to(device)
    images = calib_images(dtype)
    calib = None if name in DATA_FREE else list(images.split(16))
    return model, postquant.quantize(model, recipes[name], calib=calib, example_inputs=images[:4])


def tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return dict(model.named_parameters()) | dict(model.named_buffers())


def assert_on(model: nn.Module, device: torch.device) -> None:
    wrong = {k: str(t.device) for k, t in tensors(model).items() if t.device.type != device.type}
    assert not wrong, f"tensors off {device}: {wrong}"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm())


# ------------------------------------------------------------------------------------------------ devices


@pytest.mark.parametrize("name", [*RECIPES, "observer-mse", "bn-noise", "squant-noise"])
def test_every_stage_runs_on_the_models_device(name, device):
    model, q = quantize(name, device)
    assert_on(q, device)
    assert_on(model, device)  # the float model stays too (quantize works on a copy)
    x = calib_images()[:8]
    out = run_model(q, x)  # CPU inputs: moved to the model's device
    assert out.device.type == device.type and torch.isfinite(out).all()
    if device.type != "cpu":  # the same run on the CPU: same quantized model up to float rounding
        _, q_cpu = quantize(name, torch.device("cpu"))
        ref = q_cpu(x)
        assert rel_err(out, ref) < 0.05, f"{name}: {rel_err(out, ref):.3g}"
        if "learned" not in name and name not in ("qdrop", "synthetic"):  # learned codes may flip
            codes = {k: t for k, t in tensors(q).items() if k.endswith("codes")}
            ref_codes = {k: t for k, t in tensors(q_cpu).items() if k.endswith("codes")}
            same = sum(int((codes[k].cpu() == ref_codes[k]).sum()) for k in codes)
            assert same >= 0.99 * sum(t.numel() for t in codes.values())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", ["rtn", "squant", "learned"])
def test_a_half_precision_model_quantizes_on_the_device_in_its_dtype(name, dtype, device):
    """bfloat16/float16 models quantize on the device as on the CPU: weights stay in their dtype, codes are
    the CPU's (fitted in float32), outputs are close to the CPU run's."""
    _, q = quantize(name, device, dtype)
    assert_on(q, device)
    assert all(p.dtype == dtype for p in q.parameters() if p.is_floating_point())
    x = calib_images(dtype)[:8]
    out = run_model(q, x)
    assert out.dtype == dtype and torch.isfinite(out.float()).all()
    if device.type != "cpu":
        _, q_cpu = quantize(name, torch.device("cpu"), dtype)
        assert rel_err(out.float(), q_cpu(x).float()) < 0.1
        if name != "learned":
            codes = {k: t for k, t in tensors(q).items() if k.endswith("codes")}
            ref_codes = {k: t for k, t in tensors(q_cpu).items() if k.endswith("codes")}
            same = sum(int((codes[k].cpu() == ref_codes[k]).sum()) for k in codes)
            assert same >= 0.99 * sum(t.numel() for t in codes.values())


def test_calibration_on_the_device_is_used_as_it_is(device):
    model = tiny_resnet().to(device)
    images = calib_images().to(device)
    q = postquant.quantize(model, RECIPES["learned"], calib=images)
    assert_on(q, device)


class EvalBatches:
    """Evaluation data in memory: ``(inputs, labels)`` or ``(sentence pair, scores)`` items (`evaluate`'s data)."""

    def __init__(self, task: str, n: int, items: list) -> None:
        self.task, self.n, self.path, self.items = task, n, Path(task), items

    def __iter__(self):
        return iter(self.items)


def test_evaluation_and_fidelity_run_on_the_models_device(device):
    model, q = quantize("rtn", device)
    x = calib_images()
    labels = model(x.to(device)).argmax(1).cpu()
    fid = fidelity(model, q, list(x.split(16)))  # CPU batches, models on the device
    assert fid["top1_agreement"] > 50 and fid["sqnr_db"] > 5
    data = EvalBatches("classification", 32, [(x[:16], labels[:16]), (x[16:], labels[16:])])
    result = evaluate(model, SimpleNamespace(name="tiny", task="classification"), progress=False, data=data)
    assert result.value == 100.0 and result.n == 32


class TinyEncoder(nn.Module):
    """Token ids and a padding mask -> (N, T, H) hidden states (a BERT-like interface)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.proj = nn.Linear(8, 8)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.proj(self.embed(input_ids)) * attention_mask.unsqueeze(-1)


def test_tokenized_batches_and_sentence_similarity_on_the_models_device(device):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = TinyEncoder().to(device)
    ids = torch.randint(0, 20, (8, 5), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(8, 5, dtype=torch.long)
    mask[:, 3:] = 0
    batch = transformers.BatchEncoding({"input_ids": ids, "attention_mask": mask})  # a tokenizer's output
    q = postquant.quantize(model, {"method": "rtn", "w_bits": 8, "a_bits": 8}, calib=[batch, dict(batch)])
    assert_on(q, device)
    pairs = [(SimpleNamespace(first=batch, second=dict(batch)), torch.linspace(0, 5, 8))]
    data = EvalBatches("sts", 8, pairs)
    result = evaluate(q, SimpleNamespace(name="tiny", task="sts"), progress=False, data=data)
    assert result.n == 8


def test_onnx_export_of_a_model_on_the_device(device, tmp_path):
    pytest.importorskip("onnxruntime")
    from postquant.io import export_onnx

    _, q = quantize("rtn", device)
    x = calib_images()
    result = export_onnx(q, x[:2].to(device), tmp_path / "m.onnx", verify_batches=[x])
    assert (tmp_path / "m.onnx").exists() and result["top1_agreement"] >= 90.0
    assert_on(q, device)  # the export did not move the model


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_unit_caches_spill_to_cpu_memory_beyond_the_bound_and_learn_the_same():
    from postquant.model.blocks import make_units
    from postquant.reconstruct import Loss, OutputMetric
    from postquant.reconstruct.cache import collect_unit_data

    model = tiny_resnet().cuda()
    images = list(calib_images().split(8))
    q = postquant.quantize(model, {"method": "rtn", "w_bits": 4}, calib=images)
    teacher = tiny_resnet().cuda()
    unit = make_units(q, "block", None, 1)[1]
    full = collect_unit_data(q, teacher, unit, images, need_float_input=True, loss=Loss.MSE, output_metric=OutputMetric.AUTO,
                             max_bytes=1 << 30)  # fmt: skip
    size = full.records[0].nbytes // len(images)  # bytes per batch
    spilled = collect_unit_data(q, teacher, unit, images, need_float_input=True, loss=Loss.MSE, output_metric=OutputMetric.AUTO,
                                max_bytes=2 * size)  # fmt: skip
    assert [r.device.type for r in spilled.records] == ["cuda", "cpu"] and spilled.n == full.n
    assert spilled.records[1].target.is_pinned()
    for a, b in zip(full.per_batch(), spilled.per_batch(), strict=True):
        assert torch.equal(a.target.cpu(), b.target.cpu())
    recipe = {"method": "learned", "w_bits": 4, "a_bits": 4, "learned": {**LEARNED, "max_cache_mb": 1}}
    assert_on(postquant.quantize(model, recipe, calib=images), torch.device("cuda"))


# ------------------------------------------------------------------------------------ the float64 stand-in


@pytest.mark.parametrize("name", [*RECIPES, *OBSERVERS])
def test_a_float64_model_stays_float64_through_every_stage(name):
    _, q = quantize(name, torch.device("cpu"), torch.float64)
    floats = {k: t.dtype for k, t in tensors(q).items() if t.is_floating_point()}
    assert floats and all(d == torch.float64 for d in floats.values()), {
        k: d for k, d in floats.items() if d != torch.float64
    }
    out = q(calib_images(torch.float64)[:4])
    assert out.dtype == torch.float64 and torch.isfinite(out).all()


def test_float32_batches_from_a_dataloader_are_cast_for_a_float64_model():
    model = tiny_resnet(torch.float64)
    x = calib_images()  # float32
    loader = DataLoader(TensorDataset(x, torch.arange(32) % 5), batch_size=16)  # (inputs, labels) tuples
    recipe = {"method": "rtn", "w_bits": 8, "a_bits": 8}
    q = postquant.quantize(model, recipe, calib=loader)
    ref = postquant.quantize(model, recipe, calib=list(x.double().split(16)))
    assert torch.equal(q(x.double()), ref(x.double()))
    assert run_model(q, x).dtype == torch.float64


def test_move_batch_moves_nested_batches_and_keeps_integer_dtypes():
    transformers = pytest.importorskip("transformers")
    enc = transformers.BatchEncoding({"input_ids": torch.zeros(2, 3, dtype=torch.long), "x": torch.ones(2)})
    batch = (torch.ones(2, 3), [enc, {"m": torch.ones(2, dtype=torch.bool)}], "flag")
    moved = move_batch(batch, "meta", torch.float64)
    assert moved[0].device.type == "meta" and moved[0].dtype == torch.float64
    assert isinstance(moved[1][0], dict) and moved[1][0]["input_ids"].dtype == torch.long
    assert moved[1][0]["input_ids"].device.type == "meta" and moved[1][0]["x"].dtype == torch.float64
    assert moved[1][1]["m"].dtype == torch.bool and moved[2] == "flag"
    same = torch.ones(2)
    assert move_batch(same, "cpu") is same  # nothing to move: no copy
    assert isinstance(move_batch(enc, "meta"), dict)


def test_model_placement_is_its_parameters_device_and_float_dtype():
    assert model_placement(tiny_resnet(torch.float64)) == (torch.device("cpu"), torch.float64)
    mixed = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2).double())
    assert model_placement(mixed) == (torch.device("cpu"), None)
    assert model_placement(nn.ReLU()) == (torch.device("cpu"), None)
