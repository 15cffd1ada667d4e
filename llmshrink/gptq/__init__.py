"""GPTQ-style weight quantization.

`quantize.py` is the entry point (`llmshrink.quantize`); `config.py` holds `GPTQConfig` and the
table of algorithms (GPTQ, round-to-nearest) it names; `algorithm.py` the tensor math;
`packing.py` the standard GPTQ checkpoint tensors (their bit layout is `llmshrink.kernels.layout`).
Quantizing a checkpoint: `apply.py` walks the model layer by layer, `passes.py` runs the
calibration forwards, `layers.py` quantizes a layer's linears and the head, `resume.py` keeps the
`.partial` folder an interrupted run resumes from, `embedding.py` quantizes the input embedding
(`embed_bits`), `write.py` writes the checkpoint.
Loading: `linear.py` / `load.py` / `hf.py`, the quantized modules and their loaders (the matmul
itself is in `llmshrink.kernels`); `compat.py` what vLLM reads.
"""

from .algorithm import QuantResult, accumulate_hessian, gptq_quantize, rtn_quantize
from .packing import SUPPORTED_BITS, dequantize_gptq, pack_gptq, unpack_gptq

__all__ = ["QuantResult", "SUPPORTED_BITS", "accumulate_hessian", "dequantize_gptq", "gptq_quantize",
           "pack_gptq", "rtn_quantize", "unpack_gptq"]
