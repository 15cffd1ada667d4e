"""Delta codecs as pure tensor math: a delta matrix into a few named tensors, and back.

Every encoder takes `delta = finetuned - base` as a [out, in] fp32 tensor and returns a dict of
tensors, keyed by the suffix they get in the checkpoint (`<weight name>.<suffix>`). The codec
objects of `codecs.py` put these together with decoding, applying and serving.
"""

from __future__ import annotations

import torch

from ..errors import UsageError
from ..gptq.packing import pack_rows, unpack_rows

__all__ = ["pack_bits", "unpack_bits", "signs", "bitdelta", "lowrank", "dare", "mixed", "mixed_factors"]


# ---- 1-bit planes: 32 booleans per int32 word, along the last dim ---------------------------------

def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """[out, in] bool -> [out, ceil(in / 32)] int32; bit i of word j is element 32 * j + i."""
    out, n = bits.shape
    padded = torch.zeros((out, -(-n // 32) * 32), dtype=torch.int64)
    padded[:, :n] = bits.to(torch.int64)
    words = (padded.view(out, -1, 32) << torch.arange(32, dtype=torch.int64)).sum(-1)  # [out, n/32], < 2**32
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_bits(words: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of `pack_bits`: [out, ceil(n / 32)] int32 -> [out, n] bool."""
    shifts = torch.arange(32, dtype=torch.int32, device=words.device)
    bits = (words.unsqueeze(-1) >> shifts) & 1  # [out, n/32, 32]; arithmetic shift, masked
    return bits.reshape(words.shape[0], -1)[:, :n].bool()


def signs(words: torch.Tensor, n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Packed sign bits -> [out, n] of +1 / -1 in `dtype`."""
    return unpack_bits(words, n).to(dtype) * 2 - 1


# ---- the codecs -----------------------------------------------------------------------------------

def bitdelta(delta: torch.Tensor, granularity: str = "tensor") -> dict[str, torch.Tensor]:
    """BitDelta: sign(delta) and the scale that minimises the L2 error, mean |delta|.

    Returns {"sign": [out, in/32] int32 (bit 1 = delta >= 0), "scale": [1] or [out, 1] fp32}."""
    if granularity == "tensor":
        scale = delta.abs().mean().reshape(1)
    else:
        scale = delta.abs().mean(dim=1, keepdim=True)  # [out, 1]
    return {"sign": pack_bits(delta >= 0), "scale": scale.float()}


def lowrank(delta: torch.Tensor, rank: int | None = None, energy: float | None = None) -> dict[str, torch.Tensor]:
    """Truncated SVD: delta ~ u @ v with u = U_r * S_r [out, r], v = V_r^T [r, in], both fp16."""
    U, S, Vh = torch.linalg.svd(delta.float(), full_matrices=False)
    if rank is None:
        share = (S**2).cumsum(0) / (S**2).sum().clamp_min(1e-30)
        rank = min(int((share < energy).sum()) + 1, len(S))  # fp32 sums may never reach energy ~ 1
    if rank > len(S):
        raise UsageError(f"rank={rank} is larger than the {tuple(delta.shape)} matrix allows "
                         f"(at most {len(S)}); use a smaller rank or an energy threshold")
    return {"u": (U[:, :rank] * S[:rank]).half(), "v": Vh[:rank].half()}


def dare(delta: torch.Tensor, p: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """DARE: keep each entry with probability 1 - p, rescaled by 1 / (1 - p).

    Stored sparse as a bitmap and the kept values: {"mask": [out, in/32] int32, "values": [nnz] fp16}
    in row-major order of the kept entries."""
    keep = torch.rand(delta.shape, generator=generator) >= p
    return {"mask": pack_bits(keep), "values": (delta[keep] / (1 - p)).half()}


def _quantize_rows(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric RTN per row: x ~ codes * scale, codes in [0, 2**bits) offset by 2**(bits-1)."""
    qmax = 2 ** (bits - 1) - 1  # symmetric: 2**bits - 1 levels, e.g. -1, 0, 1 at 2 bits
    scale = (x.abs().amax(dim=1, keepdim=True) / qmax).clamp_min(1e-12)
    codes = (x / scale).round().clamp(-qmax, qmax) + 2 ** (bits - 1)
    return codes.to(torch.int32), scale.float()


def _pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """[r, n] codes -> int32 words packed along n (padded to whole words), as GPTQ packs rows."""
    r, n = codes.shape
    pad = -n % 32
    return pack_rows(torch.nn.functional.pad(codes, (0, pad)).t().contiguous(), bits)  # [n' * bits / 32, r]


def _unpack_codes(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    return unpack_rows(words, bits)[:n].t()  # [r, n]


def mixed(delta: torch.Tensor, ranks: tuple[int, ...], bits: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """Delta-CoMe style: SVD, then band k's singular directions quantized to bits[k] (top first).

    Singular values are split as sqrt(S) into both factors; each direction (a row of v_k, a column
    of u_k) gets its own scale. Bands past the matrix's rank are dropped."""
    U, S, Vh = torch.linalg.svd(delta.float(), full_matrices=False)
    root = S.sqrt()
    out: dict[str, torch.Tensor] = {}
    start = 0
    for k, (r, b) in enumerate(zip(ranks, bits)):
        stop = min(start + r, len(S))
        if stop <= start:
            break
        u = (U[:, start:stop] * root[start:stop]).t()  # [r, out]
        v = Vh[start:stop] * root[start:stop, None]  # [r, in]
        for side, x in (("u", u), ("v", v)):
            codes, scale = _quantize_rows(x, b)
            out[f"{side}{k}"] = _pack_codes(codes, b)
            out[f"{side}{k}_scale"] = scale
        start = stop
    return out


def mixed_factors(parts: dict[str, torch.Tensor], shape: tuple[int, int], bits: tuple[int, ...]):
    """Inverse of `mixed`: (u [out, r], v [r, in]) in fp32 from the quantized bands."""
    us, vs = [], []
    for k, b in enumerate(bits):
        if f"u{k}" not in parts:
            break
        for side, n, acc in (("u", shape[0], us), ("v", shape[1], vs)):
            codes = _unpack_codes(parts[f"{side}{k}"], b, n).float() - 2 ** (b - 1)
            acc.append(codes * parts[f"{side}{k}_scale"])
    return torch.cat(us).t(), torch.cat(vs)

