"""QDQ ONNX export of quantized models, verified in onnxruntime.

* `postquant.io.onnx.params`: a quantized layer's parameters in ONNX form (8- or 4-bit codes, scales, zero
  points);
* `postquant.io.onnx.rewrite`: the QDQ nodes inserted into the exported float graph;
* `postquant.io.onnx.integer`: the extra QDQ pairs of a full-integer graph (``export_onnx(full_integer=True)``);
* `postquant.io.onnx.export`: `export_onnx` (and `float_twin`, the float model it traces);
* `postquant.io.onnx.files`: the model written whole, or with its tensors in ``<name>.onnx.data`` (external
  data), staged in a temporary directory and renamed into place;
* `postquant.io.onnx.verify`: `verify_onnx` against the PyTorch simulation, `count_kernels` after onnxruntime's
  graph optimizations.

onnx and onnxruntime are optional dependencies (``postquant[onnx]``), imported when these functions run.
"""

from postquant.io.onnx.export import Exporter, export_onnx, float_twin
from postquant.io.onnx.params import Int4Weights, Int8Weights, cpu_has_vnni
from postquant.io.onnx.verify import MIN_SQNR_DB, MIN_TOP1_AGREEMENT, count_kernels, verify_onnx

__all__ = [
    "MIN_SQNR_DB",
    "MIN_TOP1_AGREEMENT",
    "Exporter",
    "Int4Weights",
    "Int8Weights",
    "count_kernels",
    "cpu_has_vnni",
    "export_onnx",
    "float_twin",
    "verify_onnx",
]
