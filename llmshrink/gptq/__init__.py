"""GPTQ-style weight quantization (work in progress: the pure math and the checkpoint layout).

`algorithm.py` holds the tensor math, `packing.py` the standard GPTQ checkpoint layout. The model
walker, save/load and the CLI come next (see the GPTQ issue).
"""

from .algorithm import QuantResult, accumulate_hessian, gptq_quantize, rtn_quantize
from .packing import SUPPORTED_BITS, dequantize_gptq, pack_gptq, unpack_gptq

__all__ = ["QuantResult", "SUPPORTED_BITS", "accumulate_hessian", "dequantize_gptq", "gptq_quantize",
           "pack_gptq", "rtn_quantize", "unpack_gptq"]
