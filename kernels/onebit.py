"""1-bit sign matmul for BitDelta deltas: `y = scale * (x @ sign(D).T)`, signs packed 32 per int32.

The packing is `llmshrink.delta.algorithm.pack_bits`: [out, ceil(in / 32)] int32, bit i of word
j is the sign of column 32 * j + i (1 = +1, 0 = -1). `scale` is [1] (per matrix) or [out, 1].

`sign_matmul` picks the Triton kernel on CUDA and the torch reference elsewhere (the reference
unpacks the signs tile by tile, so its temporary memory is one tile, not the matrix).
"""

from __future__ import annotations

import os

import torch

try:  # Triton is a Linux-only dependency; without it the reference serves every device.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on platforms without triton
    triton = None

from .gpu_compile import TRITON_TYPE, compile_for_gpu
from .triton_gptq import FP32_PRECISION

__all__ = ["sign_matmul", "sign_matmul_reference", "sign_matmul_triton", "compile_report"]

_TILE_ROWS = 2048  # output rows unpacked at a time by the reference
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def sign_matmul_reference(x: torch.Tensor, words: torch.Tensor, scale: torch.Tensor, n: int) -> torch.Tensor:
    """[..., n] x [out, ceil(n/32)] int32 signs -> [..., out], in x's dtype (fp32 accumulation on CPU)."""
    shifts = torch.arange(32, dtype=torch.int32, device=words.device)
    x2 = x.reshape(-1, n)
    out = []
    for start in range(0, words.shape[0], _TILE_ROWS):
        w = words[start:start + _TILE_ROWS]
        bits = ((w.unsqueeze(-1) >> shifts) & 1).reshape(w.shape[0], -1)[:, :n]  # [tile, n]
        out.append(x2 @ (bits.to(x.dtype) * 2 - 1).t())
    y = torch.cat(out, dim=-1)
    scale = scale.to(y.dtype).reshape(1, -1) if scale.numel() > 1 else scale.to(y.dtype)
    return (y * scale).reshape(*x.shape[:-1], words.shape[0])


if triton is not None:
    _SPACE = ((16, 64, 2, 4), (16, 128, 2, 4), (32, 64, 4, 4), (64, 128, 2, 8))  # BLOCK_M, BLOCK_N, words, warps
    _STAGES = 2  # pipelining depth, as in the GPTQ kernel (Triton's default 3 needs ~1.6x the shared memory)
    _FP32_PRECISION = tl.constexpr(FP32_PRECISION)

    @triton.autotune(configs=[triton.Config({"BLOCK_M": m, "BLOCK_N": nb, "BLOCK_K": 32 * kw}, num_warps=w,
                                            num_stages=_STAGES)
                              for m, nb, kw, w in (_SPACE[:1] if _INTERPRET else _SPACE)],  # nothing to tune there
                     key=["M_BUCKET", "N", "K", "NATIVE"])  # tuned per power-of-two row count, not per M
    @triton.jit
    def _sign_matmul_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, KW, stride_xm, stride_ym, M_BUCKET,
                            PER_ROW: tl.constexpr, NATIVE: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # y[m, n] = scale[n] * sum_k x[m, k] * (2 * bit(w[n, k // 32], k % 32) - 1)
        # NATIVE: fp16/bf16 x on a GPU, dotted in its own dtype (+-1 is exact there; tensor cores);
        # otherwise both sides in fp32, as the interpreter needs: 3xTF32 on an NVIDIA GPU (tensor
        # cores, about fp32's accuracy), IEEE on ROCm; the interpreter multiplies in exact fp32.
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # rm * stride may pass 2**31
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :],
                        mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
            words = tl.load(w_ptr + rn[None, :].to(tl.int64) * KW + (rk[:, None] // 32),
                            mask=(rn[None, :] < N) & (rk[:, None] < K), other=0)  # [BLOCK_K, BLOCK_N]
            bit = (words >> (rk[:, None] % 32)) & 1
            if NATIVE:
                acc += tl.dot(x, (bit * 2 - 1).to(x.dtype))
            else:
                acc += tl.dot(x.to(tl.float32), (bit * 2 - 1).to(tl.float32), input_precision=_FP32_PRECISION)
        if PER_ROW:
            s = tl.load(s_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
            acc = acc * s[None, :]
        else:
            acc = acc * tl.load(s_ptr).to(tl.float32)
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=(rm[:, None] < M) & (rn[None, :] < N))


def sign_matmul_triton(x: torch.Tensor, words: torch.Tensor, scale: torch.Tensor, n: int) -> torch.Tensor:
    """The Triton kernel (CUDA, or the CPU under TRITON_INTERPRET=1). Accumulates in fp32; under
    the interpreter the inputs are cast to fp32 inside the kernel, so its wrong bf16 `tl.dot` is
    never hit."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    x2 = x.reshape(-1, n).contiguous()
    M, N = x2.shape[0], words.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))  # noqa: E731
    native = x.dtype in (torch.float16, torch.bfloat16) and not _INTERPRET
    _sign_matmul_kernel[grid](x2, words.contiguous(), scale.reshape(-1).float().contiguous(), y, M, N, n,
                              words.shape[1], x2.stride(0), y.stride(0), triton.next_power_of_2(M),
                              PER_ROW=scale.numel() > 1, NATIVE=native)
    return y.reshape(*x.shape[:-1], N)


def compile_report(block: tuple[int, int, int, int], *, dtype: torch.dtype = torch.float16, per_row: bool = True,
                   arch: int = 90) -> dict:
    """Compile the kernel for sm_`arch` with one block shape of its autotune space (BLOCK_M, BLOCK_N,
    words per BLOCK_K, warps), as a GPU launch builds it, on a machine without a GPU (kernels.gpu_compile)."""
    t = TRITON_TYPE[dtype]
    m, nb, kw, warps = block
    constexprs = dict(PER_ROW=per_row, NATIVE=dtype != torch.float32, BLOCK_M=m, BLOCK_N=nb, BLOCK_K=32 * kw)
    signature = {"x_ptr": f"*{t}", "w_ptr": "*i32", "s_ptr": "*fp32", "y_ptr": f"*{t}", "M": "i32", "N": "i32",
                 "K": "i32", "KW": "i32", "stride_xm": "i32", "stride_ym": "i32", "M_BUCKET": "i32",
                 **dict.fromkeys(constexprs, "constexpr")}
    return compile_for_gpu(_sign_matmul_kernel.fn, signature, constexprs, arch=arch, num_warps=warps,
                           num_stages=_STAGES, aligned=("x_ptr", "w_ptr", "s_ptr", "y_ptr", "N", "K", "stride_xm",
                                                        "stride_ym"))


def sign_matmul(x: torch.Tensor, words: torch.Tensor, scale: torch.Tensor, n: int) -> torch.Tensor:
    """`scale * (x @ sign.T)`: Triton on CUDA, the tiled torch reference elsewhere."""
    if x.is_cuda and triton is not None:
        return sign_matmul_triton(x, words, scale, n)
    return sign_matmul_reference(x, words, scale, n)
