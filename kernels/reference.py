"""The reference kernel: dequantize the whole weight from the checkpoint tensors, then `F.linear`.

Serves every layout on every device; the oracle the other kernels are tested against."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Kernel

__all__ = ["ReferenceKernel"]


class ReferenceKernel(Kernel):
    name = "reference"
    differentiable = True  # plain torch ops

    def __init__(self, layer, device, dtype):
        super().__init__(layer, device, dtype)
        self.layer = layer  # reads the checkpoint buffers at each call: nothing repacked

    @classmethod
    def supports(cls, layer, device, dtype):
        return None

    def forward(self, x):
        return F.linear(x, self.layer.dequantized_weight().to(x.dtype), self.bias)
