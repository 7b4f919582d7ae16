"""Saving, loading and exporting quantized models: packed safetensors checkpoints, QDQ ONNX, compressed-tensors
checkpoints for Hugging Face transformers and vLLM, GGUF for llama.cpp, HTML reports.

onnx/onnxruntime (``export_onnx``, ``verify_onnx``), transformers/compressed-tensors
(``export_compressed_tensors``, ``verify_compressed_tensors``), gguf (``export_gguf``) and matplotlib
(``write_report``) are optional dependencies, imported only when those functions run.
"""

from postquant.io.checkpoint import build_quantized_layer, checkpoint_size, float_size, load, save
from postquant.io.compressed_tensors import (
    CompressedTensorsExport,
    export_compressed_tensors,
    verify_compressed_tensors,
)
from postquant.io.gguf_export import export_gguf
from postquant.io.onnx import export_onnx, verify_onnx
from postquant.io.pack import pack_codes, packed_nbytes, unpack_codes
from postquant.io.report import write_report

__all__ = [
    "CompressedTensorsExport",
    "build_quantized_layer",
    "checkpoint_size",
    "export_compressed_tensors",
    "export_gguf",
    "export_onnx",
    "float_size",
    "load",
    "pack_codes",
    "packed_nbytes",
    "save",
    "unpack_codes",
    "verify_compressed_tensors",
    "verify_onnx",
    "write_report",
]
