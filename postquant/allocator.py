"""Reuse of freed CPU memory for large tensors (glibc's malloc), for command-line runs.

glibc serves every allocation above 32 MB (a batch of activations) with a fresh ``mmap`` and gives it back to the
kernel when freed, so each such tensor first touches new zero-filled pages: a page fault per 4 KB. On a small
virtual machine those faults cost more than the convolutions (EfficientNet-Lite0, 32 images: 2-3x slower
forward passes than with reused memory). `reuse_freed_memory` makes malloc keep freed memory in its heap for the
next tensor. It changes no computed value, only where memory comes from, for the whole process; the process then
keeps its peak memory until it exits. So the library never calls it: a program (the CLI, a benchmark) may.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

log = logging.getLogger(__name__)

__all__ = ["reuse_freed_memory"]

# mallopt parameters (glibc malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1


def reuse_freed_memory() -> bool:
    """Serve every allocation from malloc's heap and never trim it (``mallopt(M_MMAP_MAX, 0)``,
    ``mallopt(M_TRIM_THRESHOLD, INT_MAX)``), the runtime form of ``MALLOC_MMAP_MAX_=0
    MALLOC_TRIM_THRESHOLD_=...``.

    Returns:
        True when applied (Linux with glibc); False elsewhere, where nothing changes.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    applied = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, _INT_MAX) == 1
    log.debug("malloc keeps freed memory for reuse: %s", applied)
    return applied
