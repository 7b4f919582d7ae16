"""reuse_freed_memory: a large tensor reuses the pages a freed one held instead of faulting in new ones."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

_PROGRAM = """
import resource, torch
from postquant.allocator import reuse_freed_memory

def faults(n):  # page faults of a tensor of n float32 ones, filled then freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(n)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

faults(32 * 2**20)
default = faults(24 * 2**20)  # 96 MB: a fresh mapping
applied = reuse_freed_memory()
faults(32 * 2**20)  # 128 MB from the heap: faulted in once
print(applied, default, faults(24 * 2**20))  # 96 MB: inside the freed 128 MB
"""


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only"
)
def test_freed_memory_is_reused_without_page_faults():
    out = subprocess.run([sys.executable, "-c", _PROGRAM], capture_output=True, text=True, check=True)
    applied, default, reused = out.stdout.split()
    assert applied == "True"
    assert int(default) > 10_000  # 96 MB of fresh pages: 24576 faults of 4 KB (fewer with huge pages)
    assert int(reused) < int(default) / 10
