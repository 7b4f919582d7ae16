"""postquant's lab: the named models and data sets (zoo), task evaluation, the study, and the command line.

The library (`postquant`) never imports this package; the lab builds on the library's public API.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["evaluate", "load", "load_model"]

_LAZY = {
    "evaluate": "postquant_lab.evaluate",
    "load": "postquant_lab.checkpoint",
    "load_model": "postquant_lab.zoo",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'postquant_lab' has no attribute {name!r}")
