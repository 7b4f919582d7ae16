"""Saving, loading and exporting quantized models: packed safetensors checkpoints, QDQ ONNX, GGUF for llama.cpp,
HTML reports.

onnx/onnxruntime (``export_onnx``, ``verify_onnx``), gguf (``export_gguf``) and matplotlib (``write_report``) are
optional dependencies, imported only when those functions run.
"""

from postquant.io.checkpoint import build_quantized_layer, checkpoint_size, float_size, load, save
from postquant.io.gguf_export import export_gguf
from postquant.io.onnx_export import export_onnx, verify_onnx
from postquant.io.pack import pack_codes, packed_nbytes, unpack_codes
from postquant.io.report import write_report

__all__ = [
    "build_quantized_layer",
    "checkpoint_size",
    "export_gguf",
    "export_onnx",
    "float_size",
    "load",
    "pack_codes",
    "packed_nbytes",
    "save",
    "unpack_codes",
    "verify_onnx",
    "write_report",
]
