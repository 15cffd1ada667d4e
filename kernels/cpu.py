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
- `torch-dequant`: dequantizes output-feature tiles straight from the packed `qweight` (shifts
  and masks, group scales broadcast where the groups are uniform; nothing stored beyond
  per-group scales) and multiplies tile by tile: any layout and dtype, bounded temporary memory.
- Weight-only matmuls stop paying once the matmul is compute-bound: from `dense_rows` rows on
  (prefill, batched scoring) torch-int4/int8 hand the call to torch-dequant, i.e. dequantize once
  and a dense bf16 matmul (crossovers measured by `bench/kernels.py --only-crossover`). The two
  paths round differently, so results agree to bf16 precision, not bit for bit, across that line.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .base import Kernel, sorted_groups, unpacked_codes, unpacked_zeros
from .layout import unpack_rows

__all__ = ["Int4CpuKernel", "Int8CpuKernel", "TiledDequantKernel", "native_bf16_cpu"]

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_INT4_GROUPS = (256, 128, 64, 32)


def native_bf16_cpu() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX): bf16 forwards pay there."""
    return getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() \
        or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()


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
    DENSE_ROWS = 256  # from this many rows on, dequantize + dense bf16 matmul is faster (bench/kernels.py)

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
        self.dense, self.dense_rows = TiledDequantKernel(layer, device, dtype), self.DENSE_ROWS

    def forward(self, x):
        if x.numel() >= self.dense_rows * self.in_features:
            return self.dense(x)
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
    DENSE_ROWS = {"grouped": 64, "per-channel": 128}  # one int8 matmul per group pays off sooner

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
        self.dense = TiledDequantKernel(layer, device, dtype)
        self.dense_rows = self.DENSE_ROWS["per-channel" if self.size >= self.in_features else "grouped"]

    def forward(self, x):
        if x.numel() >= self.dense_rows * self.in_features:
            return self.dense(x)
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
        self.bits = layer.bits
        # The layer's own buffer, nothing copied (QuantLinear drops its kernel when its buffers are
        # replaced or moved; writing into qweight in place would mix new codes with these scales).
        self.qweight = layer.qweight.to(device)
        layout = sorted_groups(layer.g_idx, layer.group_size)
        self.perm, self.size = layout if layout is not None else (None, None)
        if self.size is not None:
            self.size = min(self.size, self.in_features)  # one group wider than the layer
        self.g_idx = None if layout is not None else layer.g_idx.to(device=device, dtype=torch.long)
        # W = (code - zero) * scale: code - zero is an exact integer in every float dtype (|.| < 256),
        # so the weight is rounded once, as the reference rounds it.
        self.scales = layer.scales.to(device=device, dtype=dtype)  # [groups, out]
        self.zeros = unpacked_zeros(layer).to(device=device, dtype=dtype)
        self.shifts = (torch.arange(0, 32, self.bits, dtype=torch.int32, device=device)[:, None]
                       if 32 % self.bits == 0 else None)
        self.tile = max(16, self.TILE_ELEMENTS // self.in_features)

    def _codes(self, cols: slice) -> torch.Tensor:
        """[in, cols] codes of output features `cols` in the kernel's dtype, input channels in `perm` order."""
        words = self.qweight[:, cols]
        if self.shifts is None:  # 3-bit codes straddle words
            codes = unpack_rows(words, self.bits, self.in_features)
        else:
            codes = ((words[:, None, :] >> self.shifts) & ((1 << self.bits) - 1)).flatten(0, 1)
        codes = codes.to(self.dtype)  # before the gather: index_select is ~7x faster on 16-bit rows than int32
        return codes if self.perm is None else torch.index_select(codes, 0, self.perm)

    def weight_t(self, cols: slice) -> torch.Tensor:
        """The dequantized W.T [in, cols] in the kernel's dtype (input channels in `perm` order)."""
        w = self._codes(cols)  # a fresh tensor: dequantized in place
        scales, zeros = self.scales[:, cols], self.zeros[:, cols]
        if self.g_idx is not None:  # hand-made groups: a scale per input channel
            return w.sub_(torch.index_select(zeros, 0, self.g_idx)).mul_(torch.index_select(scales, 0, self.g_idx))
        k, size = self.in_features, self.size
        whole = k // size
        w[:whole * size].view(whole, size, -1).sub_(zeros[:whole, None]).mul_(scales[:whole, None])
        if whole * size < k:  # a last, partial group
            w[whole * size:].sub_(zeros[whole]).mul_(scales[whole])
        return w

    def forward(self, x):
        shape = x.shape
        x = _flat(x, self, self.perm)
        n = self.out_features
        if self.tile >= n:
            y = x @ self.weight_t(slice(None))
        else:
            y = torch.cat([x @ self.weight_t(slice(o, o + self.tile)) for o in range(0, n, self.tile)], dim=1)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], n)
