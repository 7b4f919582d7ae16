"""Thin quantized layers, and an attention built from Linear layers so that it can be quantized."""

from postquant.nn.act import ActQuantizer, act_qparams
from postquant.nn.attention import LinearAttention
from postquant.nn.layer import QUANTIZABLE, QuantizedLayer

__all__ = ["QUANTIZABLE", "ActQuantizer", "LinearAttention", "QuantizedLayer", "act_qparams"]
