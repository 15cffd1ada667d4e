"""GPTQ-style weight quantization.

`algorithm.py` holds the tensor math, `packing.py` the standard GPTQ checkpoint layout,
`apply.py` the layer-by-layer walker, `linear.py` / `load.py` / `hf.py` the quantized module and
its loading (the matmul itself is in `llmshrink.kernels`), `config.py` the `GPTQConfig`.
"""

from .algorithm import QuantResult, accumulate_hessian, gptq_quantize, rtn_quantize
from .packing import SUPPORTED_BITS, dequantize_gptq, pack_gptq, unpack_gptq

__all__ = ["QuantResult", "SUPPORTED_BITS", "accumulate_hessian", "dequantize_gptq", "gptq_quantize",
           "pack_gptq", "rtn_quantize", "unpack_gptq"]
