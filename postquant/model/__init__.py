"""Walking a model: layer discovery, ignore patterns, BatchNorm folding, reconstruction units."""

from postquant.model.blocks import Unit, find_blocks, make_units
from postquant.model.fold import fold_batchnorm, fold_bn_into
from postquant.model.kernels import KernelSwap, use_int4_kernels
from postquant.model.walk import (
    dynamic_input_layers,
    matches,
    module_names,
    quantizable_layers,
    quantized_embeddings,
    quantized_layers,
    replace_module,
    set_module,
)

__all__ = [
    "KernelSwap",
    "Unit",
    "dynamic_input_layers",
    "find_blocks",
    "fold_batchnorm",
    "fold_bn_into",
    "make_units",
    "matches",
    "module_names",
    "quantizable_layers",
    "quantized_embeddings",
    "quantized_layers",
    "replace_module",
    "set_module",
    "use_int4_kernels",
]
