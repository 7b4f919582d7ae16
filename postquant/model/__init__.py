"""Walking a model: layer discovery, ignore patterns, BatchNorm folding."""

from postquant.model.fold import fold_batchnorm, fold_bn_into
from postquant.model.walk import matches, quantizable_layers, quantized_layers, set_module

__all__ = [
    "fold_batchnorm",
    "fold_bn_into",
    "matches",
    "quantizable_layers",
    "quantized_layers",
    "set_module",
]
