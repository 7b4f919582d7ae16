"""Tests of SQuant's compiled CPU loops (`postquant.rounding.squant_cpu`): loading them, where numba can
and cannot cache them. Their codes are tested against the reference in test_squant.py."""

from __future__ import annotations

import importlib.util
import logging
import subprocess
import sys
from unittest import mock

import numba
import numpy as np
import pytest

from postquant.rounding import squant_cpu


def _fresh_module():
    """A new instance of the module, whose loops are not loaded yet."""
    spec = importlib.util.spec_from_file_location("squant_cpu_fresh", squant_cpu.__file__)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_loops_are_compiled_once_and_bound_for_each_other() -> None:
    loops = squant_cpu.loops()
    assert loops is squant_cpu.loops()
    assert isinstance(loops.kernel_stage, numba.core.registry.CPUDispatcher)
    assert squant_cpu._largest is loops._largest  # the name the channel stages call it by


def test_no_writable_cache_location_compiles_in_each_process(caplog: pytest.LogCaptureFixture) -> None:
    """Where numba finds no writable cache directory (it raises RuntimeError when asked to cache), the loops
    are compiled without a cache, with one warning that says what to set, and work."""
    module = _fresh_module()
    njit = numba.njit

    def no_cache_location(*args, **kwargs):
        if kwargs.get("cache"):
            raise RuntimeError("cannot cache function: no locator available")
        return njit(*args, **kwargs)

    with mock.patch.object(numba, "njit", no_cache_location), caplog.at_level(logging.WARNING):
        loops = module.loops()
    assert [r.message for r in caplog.records if "NUMBA_CACHE_DIR" in r.message] != []
    assert len(caplog.records) == 1
    row = np.array([0.1, 0.4, 0.0, 0.4, 0.3], dtype=np.float32)
    top, idx = np.empty(6, np.float32), np.empty(6, np.int64)
    assert not loops._largest(row, 2, top, idx)  # 0.4, 0.4 | 0.3: the first two are determined
    assert sorted(idx[:2]) == [1, 3] and top[2] == np.float32(0.3)
    assert loops._largest(row, 1, top, idx)  # 0.4 | 0.4: a tie at the boundary


def test_importing_the_library_does_not_import_numba() -> None:
    code = "import sys, postquant.rounding, postquant.api; print('numba' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
