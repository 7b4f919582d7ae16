"""Shared fixtures: tiny models built here, and the location of the shared data."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from postquant.paths import shared_path
from postquant_lab.zoo import CIFAR10_PREPROCESS, ZooModel


class TinyCNN(nn.Module):
    """Conv-BN-ReLU x2, a depthwise conv, a grouped conv, global pooling and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=8)  # depthwise
        self.bn2 = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 16, 1, groups=2)  # grouped 1x1
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.conv3(x))
        return self.fc(x.mean(dim=(2, 3)))


def randomize_bn(*bns: nn.modules.batchnorm._BatchNorm) -> None:
    """Give BatchNorms non-trivial running statistics and affine parameters (from torch's global RNG)."""
    for bn in bns:
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.2, 0.2)


def make_tiny_cnn(seed: int = 0) -> TinyCNN:
    torch.manual_seed(seed)
    model = TinyCNN()
    randomize_bn(model.bn1, model.bn2)
    return model.eval()


def make_tiny_llama(layers: int = 3, seed: int = 0, vocab: int = 64, tied: bool = False) -> nn.Module:
    """A random Llama of `layers` decoder layers, hidden size 32, grouped-query attention (needs transformers);
    `tied`: the ``lm_head`` shares the token embedding's weight."""
    import transformers  # an optional extra: only the tests that build an LLM need it

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
    )
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture
def tiny_cnn() -> TinyCNN:
    return make_tiny_cnn()


@pytest.fixture
def images() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(16, 3, 12, 12)


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.conv2(torch.relu(self.conv1(x))))


class TinyResNet(nn.Module):
    """Stem conv + BN, a stage of two residual blocks, a linear head: units conv1, stage.0, stage.1, fc."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.stage = nn.Sequential(Block(c), Block(c))
        self.fc = nn.Linear(c, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage(torch.relu(self.bn1(self.conv1(x))))
        return self.fc(x.mean(dim=(2, 3)))


def make_tiny_zoo(folder: Path, name: str = "tiny-resnet") -> ZooModel:
    """A tiny residual net as a zoo model, its labels its own float predictions (FP32 = 100 %): 64 evaluation
    and 32 calibration images of 8x8 saved as .npz files in `folder`."""
    torch.manual_seed(0)
    model = TinyResNet().eval()
    model.bn1.running_mean.uniform_(-0.5, 0.5)
    model.bn1.running_var.uniform_(0.5, 2.0)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(96, 8, 8, 3), dtype=np.uint8)
    with torch.no_grad():
        y = model(CIFAR10_PREPROCESS.arrays(x)).argmax(1).numpy()
    np.savez(folder / "eval.npz", x=x[:64], y=y[:64])
    np.savez(folder / "calib.npz", x=x[64:])
    return ZooModel(
        name,
        model,
        "classification",
        (3, 8, 8),
        CIFAR10_PREPROCESS.arrays(x[:2]),
        folder / "eval.npz",
        folder / "calib.npz",
        CIFAR10_PREPROCESS,
    )


NO_CUDA = "no CUDA device: the cuda cases run on a machine with an NVIDIA GPU (select them with -m cuda)"


@pytest.fixture(
    params=[
        "cpu",
        pytest.param(
            "cuda",
            marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)],
        ),
    ]
)
def device(request) -> torch.device:
    """The device a test runs its model on: the CPU always, CUDA where there is one (marked ``cuda``).

    On CUDA, TF32 matmuls and convolutions are switched off for the test, so that results can be compared
    with the CPU's at float32 tolerances.
    """
    if request.param == "cpu":
        yield torch.device("cpu")
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield torch.device("cuda")
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture
def one_thread():
    """Use with `pytestmark = pytest.mark.usefixtures("one_thread")`: small ops on a shared 2-core machine run much faster (and deterministically) on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def require_shared(*parts: str):
    """The shared path, or a clear skip when the shared data is truly absent."""
    path = shared_path(*parts)
    if not path.exists():
        pytest.skip(f"shared data not found at {path}; set POSTQUANT_SHARED to the folder holding it")
    return path


@pytest.fixture
def other_process():
    """A live process other than this one, killed at the end (a stand-in for another worker holding claims)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc
    proc.kill()
    proc.wait()


@contextmanager
def file_size_limit(max_bytes: int) -> Iterator[None]:
    """Writes that would make a file larger than `max_bytes` fail, as on a full disk (``RLIMIT_FSIZE``: the
    write fails with EFBIG, 'File too large', instead of the process getting SIGXFSZ). POSIX only."""
    resource = pytest.importorskip("resource")
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, limits[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
