"""The standard GPTQ checkpoint tensors of one linear: `pack_gptq` encodes a quantized weight.

The bit layout itself (how codes sit in int32 words, how `qweight` / `qzeros` / `scales` /
`g_idx` decode to a weight) is `llmshrink.kernels.layout`, which the kernels read too; its names
are exported here as well, so checkpoint code needs one import.
"""

from __future__ import annotations

import torch

from ..kernels.layout import STREAM_BITS, SUPPORTED_BITS, dequantize_gptq, pack_rows, unpack_gptq, unpack_rows, unpack_zeros

__all__ = ["STREAM_BITS", "SUPPORTED_BITS", "pack_rows", "unpack_rows", "pack_gptq", "unpack_gptq", "unpack_zeros",
           "dequantize_gptq"]


def pack_gptq(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
              bits: int) -> dict[str, torch.Tensor]:
    """Tensors of one GPTQ linear.

    Args:
        codes: [out, in] integer codes, as nn.Linear's weight layout.
        zeros: [groups, out] integer zero points.
        scales: [groups, out] float scales.
        g_idx: [in] group of each input channel.
    Returns:
        {"qweight": [in*bits/32, out] int32, "qzeros": [groups, out*bits/32] int32,
         "scales": [groups, out] fp16, "g_idx": [in] int32}
    """
    zeros = zeros.to(torch.int64)
    if zeros.min() < 1 or zeros.max() > 2**bits - 1:
        # v1 stores zero - 1; a zero of 0 would wrap to 2**bits - 1 and load as 2**bits.
        raise ValueError(f"zero points must lie in [1, {2**bits - 1}] for the gptq layout; clamp them when quantizing")
    return {
        "qweight": pack_rows(codes.t().contiguous(), bits),  # [in * bits / 32, out] int32
        "qzeros": pack_rows((zeros - 1).t().contiguous(), bits).t().contiguous(),  # [groups, out * bits / 32] int32
        "scales": scales.to(torch.float16).contiguous(),
        "g_idx": g_idx.to(torch.int32).contiguous(),
    }
