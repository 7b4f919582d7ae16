"""A learned-rounding run killed with SIGKILL (no cleanup at all) resumes from its finished units and ends
with the same codes as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch

SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from torch import nn
    import postquant
    from postquant.nn import QuantizedLayer

    torch.set_num_threads(1)

    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.conv1 = nn.Conv2d(c, c, 3, padding=1)
            self.conv2 = nn.Conv2d(c, c, 3, padding=1)

        def forward(self, x):
            return torch.relu(x + self.conv2(torch.relu(self.conv1(x))))

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Sequential(*[Block(8) for _ in range(4)]))
    net.eval()
    calib = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    ckpt = None if sys.argv[2] == "-" else sys.argv[2]
    recipe = {
        "method": "qdrop", "w_bits": 3, "a_bits": 4,
        "learned": {"iters": int(sys.argv[3]), "progress": False, "first_last_w_bits": None,
                    "checkpoint_dir": ckpt},
    }
    q = postquant.quantize(net, recipe, calib=calib)
    codes = {n: m.codes for n, m in q.named_modules() if isinstance(m, QuantizedLayer)}
    torch.save({"codes": codes, "resumed": postquant.result(q).learned.resumed}, sys.argv[1])
    """
)


def _run(script: Path, out: Path, ckpt: str, iters: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(script), str(out), ckpt, str(iters)], env=env)


def _units_done(ckpt: Path) -> int:
    index = next(ckpt.glob("*/index.json"), None)
    if index is None:
        return 0
    try:
        return len(json.loads(index.read_text())["done"])
    except (json.JSONDecodeError, KeyError):  # being replaced right now
        return 0


def test_sigkilled_run_resumes_with_identical_codes(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    iters = 150
    ref_path, got_path, ckpt = tmp_path / "ref.pt", tmp_path / "got.pt", tmp_path / "ckpt"
    assert _run(script, ref_path, "-", iters).wait(timeout=300) == 0

    proc = _run(script, got_path, str(ckpt), iters)
    deadline = time.monotonic() + 300
    while _units_done(ckpt) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed: raise `iters`"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    killed_at = _units_done(ckpt)
    assert 2 <= killed_at < 5 and not got_path.exists()

    assert _run(script, got_path, str(ckpt), iters).wait(timeout=300) == 0
    ref = torch.load(ref_path, weights_only=True)
    got = torch.load(got_path, weights_only=True)
    assert got["resumed"] >= killed_at
    assert ref["codes"].keys() == got["codes"].keys()
    for name, c in ref["codes"].items():
        torch.testing.assert_close(got["codes"][name], c, rtol=0, atol=0)
