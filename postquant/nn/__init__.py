"""Thin quantized layers."""

from postquant.nn.act import ActQuantizer, act_qparams
from postquant.nn.layer import QUANTIZABLE, QuantizedLayer

__all__ = ["QUANTIZABLE", "ActQuantizer", "QuantizedLayer", "act_qparams"]
