"""postquant: post-training quantization of PyTorch models to 2-8 bits.

The public names are imported on first use (PEP 562), so that ``import postquant_lab.cli`` and
``postquant --help`` do not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "Method",
    "QuantizationResult",
    "Recipe",
    "SquantMode",
    "__version__",
    "load",
    "quantize",
    "quantize_blocks",
    "quantize_checkpoint",
    "requirements",
    "result",
    "save",
    "squant_codes",
]

_LAZY = {
    "quantize": "postquant.api",
    "quantize_blocks": "postquant.blockwise",
    "quantize_checkpoint": "postquant.blockwise",
    "save": "postquant.io.checkpoint",
    "load": "postquant.io.checkpoint",
    "Method": "postquant.recipe",
    "QuantizationResult": "postquant.outcome",
    "result": "postquant.outcome",
    "requirements": "postquant.pipeline",
    "Recipe": "postquant.recipe",
    "SquantMode": "postquant.rounding",
    "squant_codes": "postquant.rounding",
}

if TYPE_CHECKING:
    from postquant.api import quantize
    from postquant.blockwise import quantize_blocks, quantize_checkpoint
    from postquant.io.checkpoint import load, save
    from postquant.outcome import QuantizationResult, result
    from postquant.pipeline import requirements
    from postquant.recipe import Method, Recipe
    from postquant.rounding import SquantMode, squant_codes


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'postquant' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
