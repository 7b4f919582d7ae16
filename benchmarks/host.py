"""The machine a benchmark ran on, for its results: the CPU model and the instruction sets that move times."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_model(flags: tuple[str, ...] = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")) -> str:
    """``model name (those of `flags` this CPU has; VNNI or no VNNI)``, from ``/proc/cpuinfo`` where it
    exists, else the platform's processor name."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if "model name" in line), "?")
    has = set(next((line for line in info.splitlines() if line.startswith("flags")), "").split())
    shown = [f for f in flags if f in has]
    vnni = "VNNI" if {"avx512_vnni", "avx_vnni"} & has else "no VNNI"
    return f"{model} ({', '.join(shown) or 'none of ' + ', '.join(flags)}; {vnni})"
