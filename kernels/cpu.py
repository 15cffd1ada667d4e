"""CPU kernels built on PyTorch's weight-only matmuls, and a dequantize-in-tiles path.

PyTorch's CPU weight-only matmuls are fast for bf16 activations only (measured with torch 2.13
on AVX512-BF16: at one row of a 4096x4096 layer, 0.45-0.55 ms int4 and int8 against 3.5-4.1 ms
for fp32 `F.linear`; with fp32 or fp16 activations the same ops take 10-16 ms, a slow fallback
in torch), so they serve bf16 and fp32/fp16 models go through `torch-dequant`.

- `torch-int4`: `torch._weight_int4pack_mm_for_cpu` computes x @ ((q - 8) * scale + zero_term)
  per group of 32/64/128/256 input channels. GPTQ's W = scale * (q - zero) is the same with
  zero_term = scale * (8 - zero), and 2- and 3-bit codes fit its 4-bit cells, so it serves bits
  2, 3 and 4. Act-order rows are permuted once at build time; other group sizes that are
  multiples of 32 (and per-channel, group_size -1) repeat their scale over 32-channel sub-groups;
  in_features that are not a multiple of the group (576 with 128) are padded with zero
  activations, so every layer of the default model is served (torch refuses them as they are).
- `torch-int8`: `torch._weight_int8pack_mm` (per-channel scales) once per group, codes shifted to
  int8 (q - 128); asymmetric zero points are a rank-1 correction from per-group sums of x.
- `torch-dequant`: dequantizes output-feature tiles from byte codes (group scales broadcast,
  no gathers, where the groups are uniform) and multiplies tile by tile: any layout and dtype,
  bounded temporary memory.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .base import Kernel, sorted_groups, unpacked_codes

__all__ = ["Int4CpuKernel", "Int8CpuKernel", "TiledDequantKernel"]

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_INT4_GROUPS = (256, 128, 64, 32)


def _sub_group(size: int) -> int | None:
    """The largest group size torch's int4 kernel takes that divides `size`."""
    return next((g for g in _INT4_GROUPS if size % g == 0), None)


def _cpu_float(device: torch.device, dtype: torch.dtype, floats=_FLOATS) -> str | None:
    if device.type != "cpu":
        return "CPU only"
    if dtype not in floats:
        return f"activations must be {' or '.join(str(d).removeprefix('torch.') for d in floats)}"
    return None


def _fast_bf16_op(device: torch.device, dtype: torch.dtype, op: str) -> str | None:
    """Why torch's weight-only matmul `op` cannot serve here (it is fast for bf16 only), or None."""
    if reason := _cpu_float(device, dtype, (torch.bfloat16,)):
        return f"{reason} (torch's {op} is slow for others)"
    if not hasattr(torch, op):
        return f"this torch has no {op}"
    return None


def _flat(x: torch.Tensor, kernel: Kernel, perm: torch.Tensor | None) -> torch.Tensor:
    x = x.reshape(-1, kernel.in_features)
    return x[:, perm] if perm is not None else x


class Int4CpuKernel(Kernel):
    name = "torch-int4"

    @classmethod
    def supports(cls, layer, device, dtype):
        if reason := _fast_bf16_op(device, dtype, "_weight_int4pack_mm_for_cpu"):
            return reason
        if layer.bits > 4:
            return "codes wider than 4 bits"
        if layer.out_features % 16:
            return "out_features must be a multiple of 16"
        layout = sorted_groups(layer.g_idx, layer.group_size)
        if layout is None:
            return "its g_idx groups are not all group_size channels"
        if _sub_group(layout[1]) is None:
            return "the group size must be a multiple of 32"
        return None

    def __init__(self, layer, device, dtype):
        super().__init__(layer, device, dtype)
        self.perm, size = sorted_groups(layer.g_idx, layer.group_size)
        self.sub = _sub_group(size)
        codes, zeros = unpacked_codes(layer, self.perm)
        k = layer.in_features
        self.pad = math.ceil(k / self.sub) * self.sub - k
        codes = F.pad(codes, (0, self.pad))  # padded channels meet zero activations
        self.packed = torch._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 2)
        group = (torch.arange((k + self.pad) // self.sub) * self.sub // size).clamp(max=zeros.shape[0] - 1)
        scales = layer.scales.float().cpu()[group]
        zero_term = scales * (8 - zeros[group].float())
        self.scales_zeros = torch.stack([scales, zero_term], -1).to(dtype).contiguous()

    def forward(self, x):
        shape = x.shape
        x = _flat(x, self, self.perm)
        if self.pad:
            x = F.pad(x, (0, self.pad))
        y = torch._weight_int4pack_mm_for_cpu(x.contiguous(), self.packed, self.sub, self.scales_zeros)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)


class Int8CpuKernel(Kernel):
    name = "torch-int8"

    @classmethod
    def supports(cls, layer, device, dtype):
        if reason := _fast_bf16_op(device, dtype, "_weight_int8pack_mm"):
            return reason
        if layer.bits != 8:
            return "8-bit codes only"
        if sorted_groups(layer.g_idx, layer.group_size) is None:
            return "its g_idx groups are not all group_size channels"
        return None

    def __init__(self, layer, device, dtype):
        super().__init__(layer, device, dtype)
        self.perm, self.size = sorted_groups(layer.g_idx, layer.group_size)
        codes, zeros = unpacked_codes(layer, self.perm)
        shifted = (codes - 128).to(torch.int8)
        self.chunks = [c.contiguous() for c in shifted.split(self.size, dim=1)]
        scales = layer.scales.float().cpu()
        self.scales = [s.to(dtype) for s in scales]
        offset = scales * (zeros.float() - 128)  # W = s * (q - 128) - s * (z - 128)
        self.offset = None if not offset.any() else offset.to(dtype)  # symmetric: none

    def forward(self, x):
        shape = x.shape
        x = _flat(x, self, self.perm).contiguous()
        parts = x.split(self.size, dim=1)
        y = sum(torch._weight_int8pack_mm(p.contiguous(), c, s) for p, c, s in zip(parts, self.chunks, self.scales))
        if self.offset is not None:
            sums = torch.stack([p.sum(1) for p in parts], 1)  # [rows, groups]
            y = y - sums @ self.offset
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)


class TiledDequantKernel(Kernel):
    name = "torch-dequant"
    differentiable = True  # plain torch ops
    TILE_ELEMENTS = 2**20  # weights dequantized at a time

    @classmethod
    def supports(cls, layer, device, dtype):
        return _cpu_float(device, dtype)

    def __init__(self, layer, device, dtype):
        super().__init__(layer, device, dtype)
        scales = layer.scales.float().cpu()
        layout = sorted_groups(layer.g_idx, layer.group_size)
        self.perm, self.pad, self.g_idx = layout[0] if layout else None, 0, None
        codes, zeros = unpacked_codes(layer, self.perm)
        if layout is not None:  # uniform groups: [out, groups, size] codes, scales broadcast per group
            size = layout[1]
            self.pad = -layer.in_features % size
            codes = F.pad(codes, (0, self.pad)).view(layer.out_features, -1, size)
            self.scales = scales.t().to(dtype)[:, :, None].contiguous()  # [out, groups, 1]
            self.zeros = (zeros.float().t() * scales.t()).to(dtype)[:, :, None].contiguous()
        else:  # any g_idx: per-channel gathers
            self.g_idx = layer.g_idx.long().cpu()
            self.scales = scales.t().to(dtype).contiguous()  # [out, groups]
            self.zeros = (zeros.float().t() * scales.t()).to(dtype).contiguous()
        self.codes = codes.to(torch.uint8)
        self.tile = max(16, self.TILE_ELEMENTS // self.codes[0].numel())

    def _weight(self, rows: slice, dtype: torch.dtype) -> torch.Tensor:
        """[tile, in (+ pad)] dequantized rows: scale * code - scale * zero."""
        codes = self.codes[rows].to(dtype)
        if self.g_idx is None:
            return torch.addcmul(-self.zeros[rows], codes, self.scales[rows]).flatten(1)
        return codes * self.scales[rows][:, self.g_idx] - self.zeros[rows][:, self.g_idx]

    def forward(self, x):
        shape = x.shape
        x = _flat(x, self, self.perm)
        if self.pad:
            x = F.pad(x, (0, self.pad))
        if self.tile >= self.out_features:
            y = F.linear(x, self._weight(slice(None), x.dtype), self.bias)
        else:
            y = torch.cat([x @ self._weight(slice(o, o + self.tile), x.dtype).t()
                           for o in range(0, self.out_features, self.tile)], dim=1)
            if self.bias is not None:
                y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)
