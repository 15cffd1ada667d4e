"""`QuantLinear`: a linear layer holding GPTQ-packed weights, computed by a kernel from `kernels/`;
`QuantEmbedding`: an input embedding whose table is packed the same way (`GPTQConfig.embed_bits`).

Their buffers carry the standard checkpoint names (`qweight`, `qzeros`, `scales`, `g_idx`, `bias`),
so their state dicts are the checkpoint. QuantLinear's forward hands x to the kernel
`llmshrink.kernels` selects for this layer, device and dtype (built at load time by
`prepare_kernels`, or at the first forward; rebuilt when the module moves or its buffers are
reloaded). QuantEmbedding's forward decodes only the rows of the ids it is given. A head tied to
a QuantEmbedding is a QuantLinear whose buffers are the embedding's own tensors (`tie_to`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..kernels import Kernel, select_kernel
from .packing import STREAM_BITS, dequantize_gptq, unpack_rows

__all__ = ["PACKED", "QuantEmbedding", "QuantLinear", "retie_heads"]

PACKED = ("qweight", "qzeros", "scales", "g_idx")  # the buffers a GPTQ module stores its weight in


def _register_packed(module: nn.Module, rows: int, cols: int, bits: int, group_size: int,
                     device: torch.device | str | None) -> None:
    """Zeroed GPTQ buffers of a [cols, rows] weight (nn.Linear's [out, in]: rows = in, cols = out)."""
    gs = rows if group_size == -1 else group_size
    groups = math.ceil(rows / gs)
    if (rows * bits) % 32 or (cols * bits) % 32:
        raise ValueError(f"a {rows}x{cols} table cannot be packed at {bits} bits: "
                         f"both sizes must fill whole int32 words")
    module.register_buffer("qweight", torch.zeros((rows * bits // 32, cols), dtype=torch.int32, device=device))
    module.register_buffer("qzeros", torch.zeros((groups, cols * bits // 32), dtype=torch.int32, device=device))
    module.register_buffer("scales", torch.zeros((groups, cols), dtype=torch.float16, device=device))
    module.register_buffer("g_idx", torch.arange(rows, dtype=torch.int32, device=device) // gs)


class QuantLinear(nn.Module):
    tied = None  # the QuantEmbedding whose tensors this head's buffers are (see tie_to), else None

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool,
                 dtype: torch.dtype = torch.float16, device: torch.device | str | None = None):
        super().__init__()
        if bits not in STREAM_BITS:  # 5-7 bits only for a head that shares a quantized embedding
            raise ValueError(f"bits={bits} is not supported; use one of {STREAM_BITS}")
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        _register_packed(self, in_features, out_features, bits, group_size, device)
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.bias = None
        self.compute_dtype = dtype
        self.kernel = None  # built from the buffers by use_kernel

    @classmethod
    def from_packed(cls, packed: dict[str, torch.Tensor], bits: int, group_size: int,
                    bias: torch.Tensor | None = None, dtype: torch.dtype = torch.float16) -> "QuantLinear":
        """Build from `pack_gptq` output (and an optional float bias)."""
        in_features = packed["g_idx"].numel()
        out_features = packed["scales"].shape[1]
        module = cls(in_features, out_features, bits, group_size, bias is not None, dtype=dtype)
        for name in ("qweight", "qzeros", "scales", "g_idx"):
            getattr(module, name).copy_(packed[name])
        if bias is not None:
            module.bias.copy_(bias)
        return module

    @classmethod
    def sharing(cls, embedding: "QuantEmbedding", bias: bool = False,
                dtype: torch.dtype = torch.float16) -> "QuantLinear":
        """An output head tied to `embedding`: its buffers are the embedding's tensors (`tie_to`)."""
        module = cls(embedding.embedding_dim, embedding.num_embeddings, embedding.bits, embedding.group_size,
                     bias, dtype=dtype, device="meta")
        module.tie_to(embedding)
        return module

    def tie_to(self, embedding: "QuantEmbedding") -> None:
        """Make this head's packed buffers the tensors of `embedding` itself, not copies.

        They are registered non-persistent, so state dicts and checkpoints hold the table once,
        under the embedding's name, and `tie_weights` (which ties `.weight` parameters) has
        nothing here to touch. Moving the model moves the embedding before the head (it comes
        first in every causal LM), and the head then takes the embedding's moved tensors instead
        of moving its own (`_apply`). Call again after the embedding's buffers are replaced, as
        a state-dict load with assign=True does (`retie_heads`)."""
        if (embedding.embedding_dim, embedding.num_embeddings, embedding.bits) != \
                (self.in_features, self.out_features, self.bits):
            raise ValueError(f"a {self.extra_repr()} head cannot share the table of {embedding.extra_repr()}")
        object.__setattr__(self, "tied", embedding)  # a plain reference: not a submodule of the head
        for name in PACKED:
            self.register_buffer(name, getattr(embedding, name), persistent=False)
        self.kernel = None

    def dequantized_weight(self) -> torch.Tensor:
        """[out, in] float32 weight these buffers encode."""
        return dequantize_gptq(self.qweight, self.qzeros, self.scales, self.g_idx, self.bits)

    def use_kernel(self, device: torch.device | str, dtype: torch.dtype, override: str | None = None) -> Kernel:
        """Select and build the kernel for activations of `dtype` on `device` (see llmshrink.kernels)."""
        self.kernel = select_kernel(self, device, dtype, override)
        return self.kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = self.kernel
        if kernel is None or kernel.device != x.device or kernel.dtype != x.dtype:
            kernel = self.use_kernel(x.device, x.dtype)
        if x.requires_grad and torch.is_grad_enabled() and not kernel.differentiable:
            return _KernelMatmul.apply(x, self, kernel)  # LoRA on a quantized base needs dx
        return kernel(x)

    def _apply(self, fn, *args, **kwargs):  # .to(), .cuda(), .half(): the kernel is rebuilt on next use
        self.kernel = None
        if self.tied is None:
            return super()._apply(fn, *args, **kwargs)
        for name in PACKED:  # a tied head takes the embedding's tensors, already moved with the model
            del self._buffers[name]
        try:
            return super()._apply(fn, *args, **kwargs)
        finally:
            for name in PACKED:
                self._buffers[name] = getattr(self.tied, name)

    def _load_from_state_dict(self, *args, **kwargs):
        self.kernel = None
        return super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}"
                + (f", kernel={self.kernel.name}" if self.kernel is not None else ""))


class QuantEmbedding(nn.Module):
    """An input embedding whose table E [vocab, dim] is stored as the GPTQ linear with out=vocab,
    in=dim that a tied head computes with: `qweight` [dim*bits/32, vocab], `qzeros`
    [groups, vocab*bits/32], `scales` [groups, vocab], `g_idx` [dim].

    The forward gathers the packed columns of the ids it is given (one column per token) and
    decodes only those rows, E[t] = scales[g, t] * (code - zero[g, t]) with g = g_idx, in float32,
    returned in `compute_dtype` (which follows `.to(dtype)`, `.half()`, `.float()`)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int, group_size: int,
                 dtype: torch.dtype = torch.float16, device: torch.device | str | None = None,
                 padding_idx: int | None = None):
        super().__init__()
        if bits not in STREAM_BITS:
            raise ValueError(f"bits={bits} is not supported; use one of {STREAM_BITS}")
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.bits, self.group_size = bits, group_size
        _register_packed(self, embedding_dim, num_embeddings, bits, group_size, device)
        self.compute_dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        codes = unpack_rows(self.qweight[:, flat], self.bits, self.embedding_dim)  # [dim, tokens] int32
        zeros = _gather_packed(self.qzeros, flat, self.bits) + 1  # [groups, tokens], stored minus one
        g = self.g_idx.long()
        rows = (codes - zeros[g]).float() * self.scales[:, flat][g].float()  # [dim, tokens]
        return rows.t().to(self.compute_dtype).reshape(*ids.shape, self.embedding_dim)

    def dequantized_weight(self) -> torch.Tensor:
        """The whole [vocab, dim] float32 table these buffers encode (the tests' reference)."""
        return dequantize_gptq(self.qweight, self.qzeros, self.scales, self.g_idx, self.bits)

    def _apply(self, fn, *args, **kwargs):
        self.compute_dtype = fn(torch.empty(0, dtype=self.compute_dtype)).dtype  # what .to() makes of floats
        return super()._apply(fn, *args, **kwargs)

    def extra_repr(self) -> str:
        return (f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, bits={self.bits}, "
                f"group_size={self.group_size}")


def _gather_packed(words: torch.Tensor, cols: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes of columns `cols` [n] from `words` [rows, m*bits/32] int32, packed along dim 1 as
    `qzeros` is (a little-endian bit stream per row): [rows, n] int64."""
    start = cols.long() * bits
    word, shift = start // 32, start % 32  # [n]
    value = (words[:, word].long() & 0xFFFFFFFF) >> shift
    spill = shift + bits > 32  # 3-bit codes that straddle two words
    if bool(spill.any()):
        high = words[:, (word + 1).clamp(max=words.shape[1] - 1)].long() & 0xFFFFFFFF
        value = torch.where(spill, value | (high << (32 - shift)), value)
    return value & ((1 << bits) - 1)


def retie_heads(model: nn.Module) -> int:
    """Point every tied head in `model` at its embedding's current tensors again (after a load
    replaced them); returns how many there are."""
    heads = [m for m in model.modules() if isinstance(m, QuantLinear) and m.tied is not None]
    for head in heads:
        head.tie_to(head.tied)
    return len(heads)


class _KernelMatmul(torch.autograd.Function):
    """y = kernel(x) forward; dx = dy @ W backward, W dequantized from the buffers when needed.

    The weights are frozen buffers, so x is the only input with a gradient (adapters trained on a
    quantized base, e.g. LoRA through peft, need it to reach earlier layers)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: QuantLinear, kernel) -> torch.Tensor:
        ctx.layer = layer
        return kernel(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight = ctx.layer.dequantized_weight().to(device=grad.device, dtype=grad.dtype)  # [out, in]
        return grad @ weight, None, None
