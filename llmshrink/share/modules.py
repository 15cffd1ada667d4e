"""SharedLinear: a linear whose weights are codes into shared values, decoded by lookup at each
forward (so only the codes and codebooks stay in memory)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError
from ..swap import swap_linear
from .layout import dequantize_shared, pack_codes, packed_inputs

__all__ = ["SharedLinear", "install_from_shapes", "shared_modules"]


class SharedLinear(nn.Module):
    """y = x W^T + b with W[o, i] = codebook[o (or 0), code[o, i]]; buffers as `layout.py` stores them."""

    def __init__(self, in_features: int, out_features: int, bits: int, codebooks: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        super().__init__()
        if codebooks not in (1, out_features):
            raise ValueError(f"codebooks={codebooks}: one per output row ({out_features}) or one per linear (1)")
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        rows = packed_inputs(in_features, bits) * bits // 32
        self.register_buffer("codes", torch.zeros(rows, out_features, dtype=torch.int32, device=device))
        self.register_buffer("codebook", torch.zeros(codebooks, 2 ** bits, dtype=torch.float16, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.bias = None

    @classmethod
    def from_codes(cls, codes: torch.Tensor, codebook: torch.Tensor, bias: torch.Tensor | None = None,
                   dtype: torch.dtype = torch.float32) -> "SharedLinear":
        """From codes [out, in] and the codebook [out or 1, 2^bits] (stored as fp16), and the bias [out]."""
        out_features, in_features = codes.shape
        bits = int(codebook.shape[1]).bit_length() - 1
        module = cls(in_features, out_features, bits, codebook.shape[0], bias=bias is not None, dtype=dtype,
                     device=codes.device)
        module.codes.copy_(pack_codes(codes, bits))
        module.codebook.copy_(codebook)
        if bias is not None:
            module.bias.copy_(bias)
        return module

    @property
    def per(self) -> str:
        return "tensor" if self.codebook.shape[0] == 1 and self.out_features > 1 else "row"

    def dequantized_weight(self) -> torch.Tensor:
        """[out, in] float32."""
        return dequantize_shared(self.codes, self.codebook, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.dequantized_weight().to(x.dtype)
        return F.linear(x, weight, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, per={self.per}"


def shared_modules(model: nn.Module) -> dict[str, SharedLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, SharedLinear)}


def install_from_shapes(model: nn.Module, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype) -> int:
    """Replace each nn.Linear whose `<name>.codebook` is among the checkpoint's (model-named)
    tensor `shapes` by an empty SharedLinear of that codebook, for its tensors to be loaded into."""
    books = {key[: -len(".codebook")]: shape for key, shape in shapes.items() if key.endswith(".codebook")}
    for name, (rows, size) in books.items():
        bits = size.bit_length() - 1
        if size != 2 ** bits or not 2 <= bits <= 8:
            raise UsageError(f"{name}.codebook holds {size} values, not 2^bits for bits 2-8; the shared checkpoint "
                             "is damaged or not llmshrink's")

        def build(linear: nn.Linear) -> SharedLinear:
            module = SharedLinear(linear.in_features, linear.out_features, bits, rows, bias=linear.bias is not None,
                                  dtype=dtype, device=linear.weight.device)
            stored = shapes.get(f"{name}.codes")
            if stored is not None and tuple(stored) != tuple(module.codes.shape):
                raise UsageError(f"{name}.codes is {list(stored)}, not the {list(module.codes.shape)} a {bits}-bit "
                                 f"{linear.out_features}x{linear.in_features} linear packs to; the checkpoint does "
                                 "not match its config")
            return module

        swap_linear(model, name, build, stored="shares")
    return len(books)
