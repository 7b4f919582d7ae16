"""postquant: post-training quantization of PyTorch models to 2-8 bits."""

from postquant.api import quantize
from postquant.io.checkpoint import load, save
from postquant.recipe import Method, Recipe
from postquant.rounding import SquantMode, squant_codes

__version__ = "0.1.0"

__all__ = ["Method", "Recipe", "SquantMode", "__version__", "load", "quantize", "save", "squant_codes"]
