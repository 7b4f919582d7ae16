"""Thin quantized layers (and embedding tables), and an attention built from Linear layers so that it can be quantized."""

from postquant.nn.act import ActQuantizer, DynamicActQuantizer, act_qparams, quantize_tokens, token_codes
from postquant.nn.attention import LinearAttention
from postquant.nn.embedding import QuantizedEmbedding
from postquant.nn.int4 import Int4Linear
from postquant.nn.layer import QUANTIZABLE, QuantizedLayer, cached_weights, compact_grid_tensor

__all__ = [
    "QUANTIZABLE",
    "ActQuantizer",
    "DynamicActQuantizer",
    "Int4Linear",
    "LinearAttention",
    "QuantizedEmbedding",
    "QuantizedLayer",
    "act_qparams",
    "cached_weights",
    "compact_grid_tensor",
    "quantize_tokens",
    "token_codes",
]
