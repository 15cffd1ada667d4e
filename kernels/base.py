"""What every kernel shares: the interface, the layer it computes, and the act-order reordering
done once at build time."""

from __future__ import annotations

from typing import ClassVar, Protocol

import torch

from .layout import unpack_gptq, unpack_zeros

__all__ = ["Kernel", "PackedLinear", "sorted_groups", "unpacked_codes", "unpacked_zeros"]


class PackedLinear(Protocol):
    """The layer a kernel computes (`llmshrink.gptq.linear.QuantLinear` is one): the GPTQ tensors
    of `llmshrink.kernels.layout`, their shape, and `use_kernel`, by which `prepare_kernels` finds
    such layers in a model."""

    in_features: int
    out_features: int
    bits: int
    group_size: int
    qweight: torch.Tensor  # [in * bits / 32, out] int32
    qzeros: torch.Tensor  # [groups, out * bits / 32] int32
    scales: torch.Tensor  # [groups, out] fp16
    g_idx: torch.Tensor  # [in] int32
    bias: torch.Tensor | None
    compute_dtype: torch.dtype  # the activations' dtype when none is asked for

    def dequantized_weight(self) -> torch.Tensor: ...

    def use_kernel(self, device: torch.device | str, dtype: torch.dtype, override: str | None = None) -> "Kernel": ...


class Kernel:
    """One way of computing a QuantLinear. Subclasses set `name`, implement `supports` (a
    classmethod returning why the kernel cannot serve, or None), build their repacked tensors in
    `__init__` and compute in `forward(x)` for x [..., in_features]."""

    name: ClassVar[str]
    automatic: ClassVar[tuple[str, ...] | None] = None  # device types select_kernel may pick it for unasked
    differentiable: ClassVar[bool] = False  # autograd reaches x through forward (else QuantLinear supplies dx)

    def __init__(self, layer: PackedLinear, device: torch.device, dtype: torch.dtype):
        self.device, self.dtype = device, dtype
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.bias = None if layer.bias is None else layer.bias.to(device=device, dtype=dtype)

    @classmethod
    def supports(cls, layer: PackedLinear, device: torch.device, dtype: torch.dtype) -> str | None:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)


def sorted_groups(g_idx: torch.Tensor, group_size: int) -> tuple[torch.Tensor | None, int] | None:
    """How to make a layer's groups contiguous: (perm, size) such that input channels taken in
    `perm` order (None: already in order) fall in consecutive groups of `size` channels (the last
    one may be partial). None when the groups are not all `size` channels (a hand-made g_idx).

    Act-order checkpoints without static groups store non-monotone `g_idx`; kernels permute the
    weight rows once with `perm` and gather x's columns with it per call (as ExLlama does)."""
    g = g_idx.long().cpu()
    k = g.numel()
    size = k if group_size == -1 else group_size
    perm = None
    if (g[1:] < g[:-1]).any():
        perm = torch.argsort(g, stable=True)
        g = g[perm]
    if not torch.equal(g, torch.arange(k) // size):
        return None
    return perm, size


def unpacked_codes(layer, perm: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes [out, in] int32, zeros [groups, out] int32) of a QuantLinear, on the CPU; with
    `perm` (from `sorted_groups`), the input channels are taken in that order."""
    codes, zeros = unpack_gptq(layer.qweight.cpu(), layer.qzeros.cpu(), layer.bits, in_features=layer.in_features)
    return (codes if perm is None else codes[:, perm.cpu()]), zeros


def unpacked_zeros(layer) -> torch.Tensor:
    """Zero points [groups, out] int32 of a QuantLinear, on its device (the codes stay packed)."""
    return unpack_zeros(layer.qzeros, layer.bits)
