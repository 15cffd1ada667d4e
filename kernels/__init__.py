"""Low-bit matmul kernels behind llmshrink's `QuantLinear`, installed as `llmshrink.kernels`.

A kernel computes `y = x @ W.T + bias` for a GPTQ-packed W (`qweight`, `qzeros`, `scales`,
`g_idx`). Each kernel class declares what it serves (`supports` returns the reason it cannot, or
None), repacks the layer's tensors once when it is built (act-order permutations included, so no
call reorders weights), and is then called with activations. `select_kernel` picks the first
kernel in `KERNELS` order that serves a layer on a device and dtype; `LLMSHRINK_KERNEL=<name>`
(or `override=`) forces one, and is an error where that kernel cannot serve.

Order (measured by bench/kernels.py, see bench/RESULTS.md): on CUDA, triton; on CPU, torch-int4
(PyTorch's int4 weight-only matmul, for 2/3/4-bit codes), torch-int8 (int8 weight-only matmul,
8-bit), torch-dequant (dequantize in tiles); `reference` (dequantize the whole weight, then
`F.linear`) serves everything, is the test oracle and the last fallback.
"""

from __future__ import annotations

import logging
import os
from collections import Counter

import torch

from .base import Kernel, PackedLinear, sorted_groups
from .cpu import Int4CpuKernel, Int8CpuKernel, TiledDequantKernel
from .reference import ReferenceKernel
from .triton_gptq import TritonKernel

__all__ = ["Kernel", "KERNELS", "SLOW", "select_kernel", "prepare_kernels", "sorted_groups"]

logger = logging.getLogger(__name__)

KERNELS: dict[str, type[Kernel]] = {k.name: k for k in (TritonKernel, Int4CpuKernel, Int8CpuKernel,
                                                           TiledDequantKernel, ReferenceKernel)}
SLOW = ("torch-dequant", "reference")  # dequantize per call: correct everywhere, slower than dense


def select_kernel(layer: PackedLinear, device: torch.device | str, dtype: torch.dtype, override: str | None = None) -> Kernel:
    """The kernel that will compute `layer` for activations of `dtype` on `device`, built."""
    device = torch.device(device)
    name = override or os.environ.get("LLMSHRINK_KERNEL") or None
    if name is not None:
        if name not in KERNELS:
            raise ValueError(f"LLMSHRINK_KERNEL={name} is not a kernel; use one of {', '.join(KERNELS)}")
        reason = KERNELS[name].supports(layer, device, dtype)
        if reason:
            raise ValueError(f"kernel '{name}' cannot compute {layer.extra_repr()} on {device.type} in "
                             f"{str(dtype).removeprefix('torch.')}: {reason}; unset LLMSHRINK_KERNEL to choose automatically")
        return KERNELS[name](layer, device, dtype)
    for cls in KERNELS.values():
        if (cls.automatic is None or device.type in cls.automatic) and cls.supports(layer, device, dtype) is None:
            return cls(layer, device, dtype)
    raise AssertionError("the reference kernel serves every layer")


def prepare_kernels(model: torch.nn.Module, device: torch.device | str | None = None,
                    dtype: torch.dtype | None = None) -> Counter:
    """Select and build the kernel of every quantized linear (QuantLinear, or any module with
    `use_kernel`: see `PackedLinear`) in `model` now, at load time rather than at the first forward;
    logs and returns how many linears each kernel serves."""
    chosen: Counter = Counter()
    slow: dict[str, str] = {}  # first slow-path module -> why the fast kernels refused it
    for name, module in model.named_modules():
        if callable(getattr(type(module), "use_kernel", None)):
            where = torch.device(device or module.qweight.device)
            kind = dtype or module.compute_dtype
            kernel = module.use_kernel(where, kind)
            chosen[kernel.name] += 1
            if kernel.name in SLOW and not slow:
                fast = [cls for cls in KERNELS.values() if cls.name not in SLOW and
                        (cls.automatic is None or where.type in cls.automatic)]
                slow[name] = "; ".join(f"{cls.name}: {cls.supports(module, where, kind)}" for cls in fast)
    if chosen:
        logger.info("llmshrink kernels: %s", ", ".join(f"{n} for {c} linears" for n, c in chosen.items()))
    if slow:
        (name, why), = slow.items()
        logger.warning("llmshrink: %d quantized linears run on a slow dequantize path (first: %s; %s)%s",
                       sum(c for n, c in chosen.items() if n in SLOW), name, why,
                       "; load in bfloat16 for torch's fast CPU kernels" if "bfloat16" in why else "")
    return chosen
