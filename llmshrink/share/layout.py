"""The stored form of a shared linear, and the weight it decodes to (the dequantize kernel's
pure-torch reference, which is also what SharedLinear computes with).

Per linear `<name>` [out, in] at `bits` bits:
- `<name>.codes` int32 [in_p * bits / 32, out]: each weight's index into its codebook, packed along
  the input dimension in the bit stream of `llmshrink.kernels.layout` (the GPTQ `qweight` rule;
  any width 2-8), in_p = in rounded up to whole int32 words (the padding codes are 0);
- `<name>.codebook` fp16 [out, 2^bits] (one per output row) or [1, 2^bits] (one per linear);
- `<name>.bias` where the linear had one.
W[o, i] = codebook[o or 0, codes[i, o]].
"""

from __future__ import annotations

import math

import torch

from ..kernels.layout import pack_rows, unpack_rows

__all__ = ["dequantize_shared", "pack_codes", "packed_inputs", "unpack_codes"]


def packed_inputs(in_features: int, bits: int) -> int:
    """in_features rounded up so that its codes fill whole int32 words."""
    word = 32 // math.gcd(bits, 32)
    return -(-in_features // word) * word


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [out, in] in [0, 2^bits) -> [packed_inputs(in) * bits / 32, out] int32."""
    out_features, in_features = codes.shape
    padded = torch.zeros(packed_inputs(in_features, bits), out_features, dtype=torch.int64, device=codes.device)
    padded[:in_features] = codes.t()
    return pack_rows(padded, bits)


def unpack_codes(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of `pack_codes`: [out, in] int64 codes."""
    return unpack_rows(packed, bits, packed.shape[0] * 32 // bits)[:in_features].t().long()


def dequantize_shared(packed: torch.Tensor, codebook: torch.Tensor, in_features: int) -> torch.Tensor:
    """The [out, in] float32 weight: each code looked up in its row's codebook (codebook [out, K]
    or [1, K], K = 2^bits)."""
    bits = int(codebook.shape[1]).bit_length() - 1
    codes = unpack_codes(packed, bits, in_features)  # [out, in]
    return codebook.float().expand(codes.shape[0], -1).gather(1, codes)
