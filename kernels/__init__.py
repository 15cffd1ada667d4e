"""Low-bit matmul kernels (Triton on GPUs, torch on CPUs), installed as `llmshrink.kernels`.

Empty until the quantized linear module exists (GPTQ issue); the kernels issue fills it.
"""

__all__: list[str] = []
