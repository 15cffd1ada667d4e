"""`QuantLinear`: a linear layer holding GPTQ-packed weights, computed through a reference path.

Its buffers carry the standard checkpoint names (`qweight`, `qzeros`, `scales`, `g_idx`, `bias`),
so its state dict is the checkpoint. The forward here dequantizes and calls `F.linear`: the
pure-torch reference that faster kernels are tested against and fall back to.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.dequantized_weight().to(x.dtype)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, weight, bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")
