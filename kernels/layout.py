"""The GPTQ bit layout: integer codes packed into int32 words, and the weight they decode to.

Pure torch, importing nothing of llmshrink: the kernels read it, and `llmshrink.gptq.packing`
(which writes checkpoints) builds on it.

Layout (AutoGPTQ / GPTQModel `checkpoint_format: gptq`, read by transformers and vLLM):
- `qweight` int32 [in * bits / 32, out]: along the input dimension, code k of a column sits at
  bits [k * bits, (k + 1) * bits) of a little-endian bit stream over consecutive int32 words.
  For 2/4/8 bits a word holds 32 / bits whole codes; for 3 bits, 32 codes span 3 words and
  codes 10 and 21 straddle word boundaries (the same stream rule covers both).
- `qzeros` int32 [groups, out * bits / 32]: zero points packed the same way along the output
  dimension, stored minus one (the v1 format's historical offset).
- `scales` fp16 [groups, out]; `g_idx` int32 [in]: group of each input channel.
- Dequantized weight, as nn.Linear's [out, in]: W[o, i] = scales[g, o] * (q[i, o] - zero[g, o]),
  g = g_idx[i].
"""

from __future__ import annotations

import math

import torch

__all__ = ["STREAM_BITS", "SUPPORTED_BITS", "pack_rows", "unpack_rows", "unpack_gptq", "unpack_zeros", "dequantize_gptq"]

SUPPORTED_BITS = (2, 3, 4, 8)  # the GPTQ format's widths, which every reader of a linear knows
# The bit stream packs any width up to 8 the way it packs 3 bits (codes straddle words); widths
# outside SUPPORTED_BITS are for what only llmshrink reads (a quantized input embedding).
STREAM_BITS = (2, 3, 4, 5, 6, 7, 8)


def _check(bits: int, n: int) -> None:
    if bits not in STREAM_BITS:
        raise ValueError(f"bits={bits} is not supported; use one of {STREAM_BITS}")
    if (n * bits) % 32:
        raise ValueError(f"{n} codes of {bits} bits do not fill whole int32 words; "
                         f"the packed dimension must be a multiple of {32 // math.gcd(bits, 32)}")


def _stream_positions(n: int, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Word index and bit shift of each of n codes in the packed bit stream."""
    start = torch.arange(n, dtype=torch.int64) * bits
    return start // 32, start % 32


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    # Reinterpret unsigned 32-bit values as int32 (two's complement), as the format stores them.
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes along dim 0 into int32 words.

    Args:
        codes: [n, m] integers in [0, 2**bits).
    Returns:
        [n * bits / 32, m] int32.
    """
    n, m = codes.shape
    _check(bits, n)
    c = codes.to(torch.int64)
    if c.min() < 0 or c.max() >= 2**bits:
        raise ValueError(f"codes must lie in [0, {2**bits - 1}] for {bits} bits")
    word, shift = _stream_positions(n, bits)
    words = torch.zeros((n * bits // 32, m), dtype=torch.int64)
    # Bit fields never overlap, so adding them is OR-ing them.
    words.index_add_(0, word, (c << shift[:, None]) & 0xFFFFFFFF)
    spill = shift + bits > 32  # codes straddling into the next word (3-bit only)
    if spill.any():
        words.index_add_(0, word[spill] + 1, c[spill] >> (32 - shift[spill])[:, None])
    return _to_int32(words)


def unpack_rows(words: torch.Tensor, bits: int, n: int | None = None) -> torch.Tensor:
    """Inverse of `pack_rows`: [n * bits / 32, m] int32 -> [n, m] int32 codes."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    n = n if n is not None else w.shape[0] * 32 // bits
    _check(bits, n)
    word, shift = _stream_positions(n, bits)
    value = w[word] >> shift[:, None]  # [n, m]
    spill = shift + bits > 32
    if spill.any():
        value[spill] |= w[word[spill] + 1] << (32 - shift[spill])[:, None]
    return (value & ((1 << bits) - 1)).to(torch.int32)


def unpack_zeros(qzeros: torch.Tensor, bits: int) -> torch.Tensor:
    """Zero points [groups, out] int32 from `qzeros`, with their +1 back."""
    return unpack_rows(qzeros.t().contiguous(), bits).t().contiguous() + 1


def unpack_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, bits: int,
                in_features: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes [out, in] int32, zeros [groups, out] int32) from packed tensors; zeros get their +1 back."""
    return unpack_rows(qweight, bits, in_features).t().contiguous(), unpack_zeros(qzeros, bits)


def dequantize_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
                    bits: int) -> torch.Tensor:
    """The [out, in] float weight of a GPTQ linear (the reference every kernel is checked against)."""
    codes, zeros = unpack_gptq(qweight, qzeros, bits, in_features=g_idx.numel())
    g = g_idx.long()
    return (codes.float() - zeros[g].t().float()) * scales[g].t().float()  # [out, in]
