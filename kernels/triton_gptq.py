"""Triton kernels for y = x @ dequant(W) on the GPTQ layout: a tiled GEMM and a split-K GEMV.

One kernel body, two launch shapes:
- GEMM (more than 8 rows): tiles of BLOCK_M x BLOCK_N outputs, the K loop inside, autotuned.
- GEMV (1 to 8 rows, decoding): BLOCK_M = 16 and the K range split over SPLIT_K programs that
  add their partial sums atomically into an fp32 buffer, so a single row still fills the GPU.

Each program unpacks the codes of a BLOCK_K x BLOCK_N weight tile straight from `qweight`
(3-bit codes that straddle two words included), loading each packed word once and repeating it
in registers, or once per code row (WORDS_ONCE, a tuning choice: which is faster is up to the
GPU). Where the groups are uniform (after act-order sorting, every checkpoint GPTQ writes) and a
tile lies inside one group (group size a multiple of BLOCK_K), it loads that group's zeros and
scales once, multiplies x by the integer tile (q - zero), exact in every dot precision, and
scales the [BLOCK_M, BLOCK_N] product; otherwise (hand-made g_idx, groups smaller than BLOCK_K)
it looks up each row's group and dequantizes the tile first. Act-order checkpoints are reordered
once when the kernel is built (rows sorted by group, as Marlin and ExLlama do); each call gathers
x's columns in the same order.

Activations are fp16, bf16 or fp32, accumulation fp32. Tiles are multiplied in the activations'
dtype: fp16 and bf16 dots, and for fp32 on the integer-tile path 3xTF32 (both operands split in
TF32 parts; about fp32's accuracy on tensor cores, where an IEEE fp32 dot runs on the FMA units
and spills registers; IEEE on ROCm), on the dequantized-tile path IEEE (3xTF32 needs more shared
memory than sm_86/89 GPUs have there for 3-bit codes). Triton's CPU interpreter multiplies in
exact fp32 whatever the precision asked, and its bf16 `tl.dot` is wrong, so there bf16 tiles are
cast to fp32 first. On the uniform-group path the products are then the same on the GPU and in
the interpreter (integer tiles, bf16 x); a dequantized tile is rounded to bf16 on the GPU only.
`python -m llmshrink.kernels.aot --arch 80|86|89|90` compiles every block shape for that GPU
without one.

On CPU the kernel runs only under TRITON_INTERPRET=1 (the tests do); it is never chosen there.
"""

from __future__ import annotations

import os

import torch

from .base import Kernel, sorted_groups, unpacked_codes
from .gpu_compile import TRITON_TYPE, compile_for_gpu
from .layout import SUPPORTED_BITS, pack_rows

__all__ = ["TritonKernel", "gptq_matmul", "compile_report"]

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is Linux-only
    triton = None

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_AUTOTUNE = not _INTERPRET and os.environ.get("LLMSHRINK_TRITON_AUTOTUNE", "1") != "0"  # read at import
# The dot each activation dtype gets (see _dot): fp16, bf16 (on a GPU) or fast fp32; bf16 under the
# interpreter, whose bf16 dot is wrong, is cast to fp32 (3: IEEE; the interpreter's dots are exact fp32).
_DOT = {torch.float16: 0, torch.bfloat16: 3 if _INTERPRET else 1, torch.float32: 2}
# Fast fp32: 3xTF32 on NVIDIA tensor cores (sm_80 on; older GPUs run it without them); IEEE on ROCm,
# whose Triton lacks it, and in the interpreter, which ignores it.
FP32_PRECISION = "ieee" if _INTERPRET or torch.version.hip else "tf32x3"
GEMV_MAX_ROWS = 8
STAGES = 2  # software-pipelining depth of every launch; compile_report must build the same


def _config(bm, bn, bk, sk, w, once):
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk, "num_warps": w, "WORDS_ONCE": once}


# The autotuner's search spaces; the first of each is what the interpreter (and an untuned run) uses.
# WORDS_ONCE: load each packed word once and repeat it in registers, or load it once per code row
# (cached, but 32 / bits load instructions per word); which is faster is the GPU's to say.
CONFIGS = {
    "gemv": [_config(16, bn, bk, sk, 4, once) for once in (0, 1) for bn in (64, 128) for bk in (64, 128)
             for sk in (4, 8, 16)],
    "gemm": [_config(*c, once) for once in (0, 1) for c in ((32, 64, 64, 1, 4), (64, 64, 64, 1, 4), (64, 128, 32, 1, 4),
                                                            (128, 128, 32, 1, 8), (128, 64, 64, 1, 4))],
}

if triton is not None:
    _FP32_PRECISION = tl.constexpr(FP32_PRECISION)  # a global a kernel may read

    @triton.jit
    def _unpack(words_lo, words_hi, shift, BITS: tl.constexpr):
        """Codes at bit `shift` of `words_lo`, continued into `words_hi` when they straddle."""
        low_bits = tl.minimum(32 - shift, BITS)
        code = (words_lo >> shift) & ((1 << low_bits) - 1)
        if BITS == 3:
            code = code | ((words_hi << low_bits) & ((1 << BITS) - 1))
        return code

    @triton.jit
    def _dot(x, w, DOT: tl.constexpr):
        """x @ w with fp32 accumulation: 0 fp16, 1 bf16, 2 fp32 as FP32_PRECISION, 3 fp32 IEEE (see
        _DOT). The operands are cast here, in the kernel, so the interpreter and the GPU run the same
        code for fp16 and fp32; bf16 takes code 3 in the interpreter."""
        if DOT == 0:
            return tl.dot(x.to(tl.float16), w.to(tl.float16))
        elif DOT == 1:
            return tl.dot(x.to(tl.bfloat16), w.to(tl.bfloat16))
        elif DOT == 2:
            return tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision=_FP32_PRECISION)
        else:
            return tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="ieee")

    @triton.jit
    def _gptq_mm(x_ptr, qw_ptr, qz_ptr, s_ptr, g_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_ym, z_stride,
                 BITS: tl.constexpr, DOT: tl.constexpr, HAS_BIAS: tl.constexpr, GROUP_SIZE: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                 WORDS_ONCE: tl.constexpr):
        pid = tl.program_id(0)
        num_n = tl.cdiv(N, BLOCK_N)
        offs_m = (pid // num_n) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = (pid % num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m, mask_n = offs_m < M, offs_n < N
        zbit = offs_n * BITS
        zword, zshift = zbit // 32, zbit % 32
        zspill = mask_n & (zshift + BITS > 32)

        k_chunk = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
        k_begin = tl.program_id(1) * k_chunk
        k_end = tl.minimum(k_begin + k_chunk, K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(k_begin, k_end, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < k_end
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            bit = offs_k * BITS
            word, shift = bit // 32, bit % 32
            kn_mask = mask_k[:, None] & mask_n[None, :]
            if WORDS_ONCE and 32 % BITS == 0:
                # Each packed word once ([BLOCK_K / codes-per-word, BLOCK_N]), then repeated down
                # the rows it holds; k0 and k_end are multiples of the codes per word.
                WORDS: tl.constexpr = BLOCK_K * BITS // 32
                offs_w = k0 * BITS // 32 + tl.arange(0, WORDS)
                words = tl.load(qw_ptr + offs_w[:, None] * N + offs_n[None, :],
                                mask=(offs_w < k_end * BITS // 32)[:, None] & mask_n[None, :], other=0)
                lo = tl.reshape(tl.broadcast_to(words[:, None, :], (WORDS, 32 // BITS, BLOCK_N)), (BLOCK_K, BLOCK_N))
                q = (lo >> shift[:, None]) & ((1 << BITS) - 1)
            else:  # a load per row (the same word for 32 / BITS rows; 3-bit codes straddle words)
                lo = tl.load(qw_ptr + word[:, None] * N + offs_n[None, :], mask=kn_mask, other=0)
                hi = lo
                if BITS == 3:
                    spill = mask_k & (shift + BITS > 32)
                    hi = tl.load(qw_ptr + (word + 1)[:, None] * N + offs_n[None, :],
                                 mask=spill[:, None] & mask_n[None, :], other=0)
                q = _unpack(lo, hi, shift[:, None], BITS)

            if GROUP_SIZE > 0 and GROUP_SIZE % BLOCK_K == 0:
                # The whole tile lies in one group: one row of zeros and scales, and the scale is
                # applied to the [BLOCK_M, BLOCK_N] product instead of the [BLOCK_K, BLOCK_N] tile.
                g = k0 // GROUP_SIZE
                z_lo = tl.load(qz_ptr + g * z_stride + zword, mask=mask_n, other=0)
                z_hi = z_lo
                if BITS == 3:
                    z_hi = tl.load(qz_ptr + g * z_stride + zword + 1, mask=zspill, other=0)
                z = _unpack(z_lo, z_hi, zshift, BITS) + 1  # the v1 layout stores zero - 1
                s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
                acc += _dot(x, (q - z[None, :]).to(tl.float32), DOT) * s[None, :]  # integers: exact in any dot
            else:  # a group per row: from g_idx (hand-made groups) or by position
                if GROUP_SIZE > 0:
                    g = offs_k // GROUP_SIZE
                else:
                    g = tl.load(g_ptr + offs_k, mask=mask_k, other=0)
                z_lo = tl.load(qz_ptr + g[:, None] * z_stride + zword[None, :], mask=kn_mask, other=0)
                z_hi = z_lo
                if BITS == 3:
                    z_hi = tl.load(qz_ptr + g[:, None] * z_stride + (zword + 1)[None, :],
                                   mask=mask_k[:, None] & zspill[None, :], other=0)
                z = _unpack(z_lo, z_hi, zshift[None, :], BITS) + 1
                s = tl.load(s_ptr + g[:, None] * N + offs_n[None, :], mask=kn_mask, other=0.0).to(tl.float32)
                # [BLOCK_K, BLOCK_N] dequantized; fp32 in IEEE here: 3xTF32 splits this tile too and
                # needs more shared memory than sm_86/89 GPUs have for 3-bit codes (kernels.aot)
                acc += _dot(x, (q - z).to(tl.float32) * s, 3 if DOT == 2 else DOT)

        y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
        out_mask = mask_m[:, None] & mask_n[None, :]
        if SPLIT_K == 1:
            if HAS_BIAS:
                acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=out_mask)
        else:
            tl.atomic_add(y_ptrs, acc, mask=out_mask)

    def _configs(gemv: bool):
        space = CONFIGS["gemv" if gemv else "gemm"]
        if not _AUTOTUNE:
            space = space[:1]  # the CPU interpreter, or LLMSHRINK_TRITON_AUTOTUNE=0 (quick GPU tests)
        return [triton.Config({k: v for k, v in c.items() if k != "num_warps"}, num_warps=c["num_warps"],
                              num_stages=STAGES)
                for c in space]

    _KEY = ["M_BUCKET", "N", "K", "BITS", "DOT", "GROUP_SIZE"]

    @triton.jit
    def _entry(x_ptr, qw_ptr, qz_ptr, s_ptr, g_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_ym, z_stride, M_BUCKET,
               BITS: tl.constexpr, DOT: tl.constexpr, HAS_BIAS: tl.constexpr, GROUP_SIZE: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
               WORDS_ONCE: tl.constexpr):
        _gptq_mm(x_ptr, qw_ptr, qz_ptr, s_ptr, g_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_ym, z_stride,
                 BITS, DOT, HAS_BIAS, GROUP_SIZE, BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, WORDS_ONCE)

    _gemm = triton.autotune(configs=_configs(gemv=False), key=_KEY)(_entry)
    _gemv = triton.autotune(configs=_configs(gemv=True), key=_KEY, reset_to_zero=["y_ptr"])(_entry)


def gptq_matmul(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                g_idx: torch.Tensor, bits: int, bias: torch.Tensor | None = None, group_size: int = 0,
                config: dict | None = None) -> torch.Tensor:
    """x [M, K] @ dequant(W) [K, N] (+ bias) for GPTQ tensors, in x's dtype. `group_size` > 0 says
    row k is in group k // group_size (sorted, uniform groups) and `g_idx` is not read; 0: any g_idx.
    `config` (one of CONFIGS) runs those block sizes instead of the autotuned ones (tests)."""
    M, K = x.shape
    N = qweight.shape[1]
    x = x.contiguous()
    gemv = M <= GEMV_MAX_ROWS
    split = config["SPLIT_K"] > 1 if config is not None else gemv  # partial sums added atomically in fp32
    y = torch.zeros((M, N), device=x.device, dtype=torch.float32) if split else torch.empty((M, N), device=x.device,
                                                                                           dtype=x.dtype)
    bucket = M if gemv else min(1 << (M - 1).bit_length(), 4096)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"])  # noqa: E731
    args = (x, qweight, qzeros, scales, g_idx, bias if bias is not None else scales, y, M, N, K, x.stride(0), y.stride(0),
            qzeros.shape[1], bucket)
    kwargs = dict(BITS=bits, DOT=_DOT[x.dtype], HAS_BIAS=bias is not None, GROUP_SIZE=group_size)
    if config is not None:
        _entry[grid](*args, **kwargs, **config, num_stages=STAGES)
    else:
        (_gemv if gemv else _gemm)[grid](*args, **kwargs)
    if split:
        y = y if bias is None else y + bias.float()
        y = y.to(x.dtype)
    return y


def compile_report(config: dict, *, dtype: torch.dtype = torch.float16, bits: int = 4, group_size: int = 128,
                   has_bias: bool = False, arch: int = 90) -> dict:
    """Compile the kernel for sm_`arch` with one of CONFIGS, as `gptq_matmul` launches it, on a machine
    without a GPU (kernels.gpu_compile): its registers, spill bytes and shared memory per program."""
    t = TRITON_TYPE[dtype]
    y = "fp32" if config["SPLIT_K"] > 1 else t
    signature = {"x_ptr": f"*{t}", "qw_ptr": "*i32", "qz_ptr": "*i32", "s_ptr": "*fp16", "g_ptr": "*i32",
                 "b_ptr": f"*{t}", "y_ptr": f"*{y}", "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32",
                 "stride_ym": "i32", "z_stride": "i32", "M_BUCKET": "i32"}
    constexprs = dict(BITS=bits, DOT=_DOT[dtype], HAS_BIAS=has_bias, GROUP_SIZE=group_size,
                      **{k: v for k, v in config.items() if k != "num_warps"})
    signature.update(dict.fromkeys(constexprs, "constexpr"))
    aligned = ("x_ptr", "qw_ptr", "qz_ptr", "s_ptr", "g_ptr", "b_ptr", "y_ptr", "N", "K", "stride_xm", "stride_ym")
    return compile_for_gpu(_entry, signature, constexprs, arch=arch, num_warps=config["num_warps"],
                           num_stages=STAGES, aligned=aligned)


class TritonKernel(Kernel):
    name = "triton"
    automatic = ("cuda",)

    @classmethod
    def supports(cls, layer, device, dtype):
        if triton is None:
            return "triton is not installed"
        if device.type != "cuda" and not (_INTERPRET and device.type == "cpu"):
            return "CUDA only (CPU only under TRITON_INTERPRET=1, for tests)"
        if dtype not in _DOT:
            return "activations must be float16, bfloat16 or float32"
        if layer.bits not in SUPPORTED_BITS:
            return f"{layer.bits}-bit codes (it reads {', '.join(map(str, SUPPORTED_BITS))})"
        return None

    def __init__(self, layer, device, dtype):
        super().__init__(layer, device, dtype)
        layout = sorted_groups(layer.g_idx, layer.group_size)
        self.group_size = 0 if layout is None else layout[1]  # 0: hand-made groups, read g_idx per row
        self.perm = None
        qweight, g_idx = layer.qweight, layer.g_idx
        if layout is not None and layout[0] is not None:  # act-order: sort rows by group once
            self.perm = layout[0].to(device)
            codes, _ = unpacked_codes(layer, layout[0])
            qweight = pack_rows(codes.t().contiguous(), layer.bits)
            g_idx = layer.g_idx.cpu()[layout[0]]
        self.qweight = qweight.to(device).contiguous()
        self.g_idx = g_idx.to(device=device, dtype=torch.int32).contiguous()
        self.qzeros = layer.qzeros.to(device).contiguous()
        self.scales = layer.scales.to(device).contiguous()
        self.bits = layer.bits

    def forward(self, x, config: dict | None = None):
        shape = x.shape
        x = x.reshape(-1, self.in_features)
        if self.perm is not None:
            x = x[:, self.perm]
        y = gptq_matmul(x, self.qweight, self.qzeros, self.scales, self.g_idx, self.bits, self.bias, self.group_size,
                        config)
        return y.reshape(*shape[:-1], self.out_features)
