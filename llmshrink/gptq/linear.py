"""`QuantLinear`: a linear layer holding GPTQ-packed weights, computed by a kernel from `kernels/`.

Its buffers carry the standard checkpoint names (`qweight`, `qzeros`, `scales`, `g_idx`, `bias`),
so its state dict is the checkpoint. The forward hands x to the kernel `llmshrink.kernels`
selects for this layer, device and dtype (built at load time by `prepare_kernels`, or at the
first forward; rebuilt when the module moves or its buffers are reloaded).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..kernels import Kernel, select_kernel
from .packing import SUPPORTED_BITS, dequantize_gptq

__all__ = ["QuantLinear"]


class QuantLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool,
                 dtype: torch.dtype = torch.float16, device: torch.device | str | None = None):
        super().__init__()
        if bits not in SUPPORTED_BITS:
            raise ValueError(f"bits={bits} is not supported; use one of {SUPPORTED_BITS}")
        gs = in_features if group_size == -1 else group_size
        groups = math.ceil(in_features / gs)
        if (in_features * bits) % 32 or (out_features * bits) % 32:
            raise ValueError(f"a {in_features}x{out_features} linear cannot be packed at {bits} bits: "
                             f"in and out features must fill whole int32 words")
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        kw = {"device": device}
        self.register_buffer("qweight", torch.zeros((in_features * bits // 32, out_features), dtype=torch.int32, **kw))
        self.register_buffer("qzeros", torch.zeros((groups, out_features * bits // 32), dtype=torch.int32, **kw))
        self.register_buffer("scales", torch.zeros((groups, out_features), dtype=torch.float16, **kw))
        self.register_buffer("g_idx", torch.arange(in_features, dtype=torch.int32, **kw) // gs)
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, **kw))
        else:
            self.bias = None
        self.compute_dtype = dtype
        self.kernel = None  # built from the buffers by use_kernel

    @classmethod
    def from_packed(cls, packed: dict[str, torch.Tensor], bits: int, group_size: int,
                    bias: torch.Tensor | None = None, dtype: torch.dtype = torch.float16) -> "QuantLinear":
        """Build from `pack_gptq` output (and an optional float bias)."""
        in_features = packed["g_idx"].numel()
        out_features = packed["scales"].shape[1]
        module = cls(in_features, out_features, bits, group_size, bias is not None, dtype=dtype)
        for name in ("qweight", "qzeros", "scales", "g_idx"):
            getattr(module, name).copy_(packed[name])
        if bias is not None:
            module.bias.copy_(bias)
        return module

    def dequantized_weight(self) -> torch.Tensor:
        """[out, in] float32 weight these buffers encode."""
        return dequantize_gptq(self.qweight, self.qzeros, self.scales, self.g_idx, self.bits)

    def use_kernel(self, device: torch.device | str, dtype: torch.dtype, override: str | None = None) -> Kernel:
        """Select and build the kernel for activations of `dtype` on `device` (see llmshrink.kernels)."""
        self.kernel = select_kernel(self, device, dtype, override)
        return self.kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = self.kernel
        if kernel is None or kernel.device != x.device or kernel.dtype != x.dtype:
            kernel = self.use_kernel(x.device, x.dtype)
        if x.requires_grad and torch.is_grad_enabled() and not kernel.differentiable:
            return _KernelMatmul.apply(x, self, kernel)  # LoRA on a quantized base needs dx
        return kernel(x)

    def _apply(self, fn, *args, **kwargs):  # .to(), .cuda(), .half(): the kernel is rebuilt on next use
        self.kernel = None
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):
        self.kernel = None
        return super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}"
                + (f", kernel={self.kernel.name}" if self.kernel is not None else ""))


class _KernelMatmul(torch.autograd.Function):
    """y = kernel(x) forward; dx = dy @ W backward, W dequantized from the buffers when needed.

    The weights are frozen buffers, so x is the only input with a gradient (adapters trained on a
    quantized base, e.g. LoRA through peft, need it to reach earlier layers)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: QuantLinear, kernel) -> torch.Tensor:
        ctx.layer = layer
        return kernel(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight = ctx.layer.dequantized_weight().to(device=grad.device, dtype=grad.dtype)  # [out, in]
        return grad @ weight, None, None
