"""Thin quantized layers, and an attention built from Linear layers so that it can be quantized."""

from postquant.nn.act import ActQuantizer, act_qparams
from postquant.nn.attention import LinearAttention
from postquant.nn.int4 import Int4Linear
from postquant.nn.layer import QUANTIZABLE, QuantizedLayer, cached_weights

__all__ = [
    "QUANTIZABLE",
    "ActQuantizer",
    "Int4Linear",
    "LinearAttention",
    "QuantizedLayer",
    "act_qparams",
    "cached_weights",
]
