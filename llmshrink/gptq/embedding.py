"""Quantize the input embedding into GPTQ tensors (`GPTQConfig.embed_bits`).

The table E [vocab, hidden] is quantized as the linear a tied head computes with (out=vocab,
in=hidden) would be: the config's grid (bits=embed_bits, its whole-groups group size, sym),
round to nearest with the range search, packed by `pack_gptq` under the embedding's own name
(`model.embed_tokens.qweight` [hidden*bits/32, vocab], `.qzeros`, `.scales`, `.g_idx`) and no
`.weight`. `QuantEmbedding` (linear.py) reads it back.

Where the output head is tied to the embedding (and `lm_head` is off), the head shares the
quantized table, stored once; logits then depend on it through the head's inputs, so the range
search is weighted by the diagonal of the head's input Hessian (`layers.head_hessian`). Where
`lm_head` is on, the head was untied and quantized on its own before this runs.

`quantize_table` is the math on plain tensors; `check_embedding` refuses before any work what
cannot be done; `quantize_embedding` finds the table in the model and records what it did.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UsageError
from .algorithm import DEFAULT_SHRINK_GRID, QuantResult, rtn_quantize
from .config import GPTQConfig
from .layers import head_hessian, head_of
from .packing import SUPPORTED_BITS, pack_gptq

__all__ = ["check_embedding", "input_embedding", "quantize_embedding", "quantize_table"]


def input_embedding(model) -> tuple[str, nn.Embedding]:
    """(name, module) of the model's input embedding: a plain `nn.Embedding`, else a UsageError
    (a subclass with its own forward, such as Gemma's scaled embedding, computes more than a lookup)."""
    embed = model.get_input_embeddings()
    if not isinstance(embed, nn.Embedding) or type(embed).forward is not nn.Embedding.forward:
        raise UsageError(f"the model's input embedding is a {type(embed).__name__}, not a plain nn.Embedding, so "
                         "embed_bits cannot quantize it; leave embed_bits off")
    return next(name for name, m in model.named_modules() if m is embed), embed


def check_embedding(model, config: GPTQConfig) -> None:
    """Refuse, before any work, an `embed_bits` the model's input embedding cannot take."""
    if config.embed_bits is None:
        return
    name, embed = input_embedding(model)
    vocab, hidden = embed.weight.shape
    fits = [b for b in SUPPORTED_BITS if vocab * b % 32 == 0 and hidden * b % 32 == 0]
    if config.embed_bits not in fits:
        fix = f"use embed_bits {' or '.join(map(str, fits))}" if fits else "leave embed_bits off"
        raise UsageError(f"{name} ({vocab}x{hidden}) cannot be packed at {config.embed_bits} bits (the vocabulary and "
                         f"width times the bits must be multiples of 32); {fix}")


def quantize_table(weight: torch.Tensor, bits: int, group_size: int, sym: bool,
                   shrink_grid: tuple[float, ...] = DEFAULT_SHRINK_GRID,
                   h_diag: torch.Tensor | None = None) -> QuantResult:
    """Quantize an embedding table `weight` [vocab, hidden] as the linear out=vocab, in=hidden.

    Round to nearest per `group_size` hidden channels of each row, each group's range searched
    over `shrink_grid` for the least error, weighted per channel by `h_diag` [hidden] (the head's
    input Hessian diagonal, where a tied head reads the table) or uniformly."""
    return rtn_quantize(weight, bits, group_size, sym, shrink_grid, h_diag)


def quantize_embedding(model, layers, final: list[tuple[torch.Tensor, dict]], config: GPTQConfig,
                       tuple_output: bool) -> tuple[dict, dict]:
    """Quantize the model's input embedding at `config.embed_bits`, after the layers and the head.

    Args:
        model: the model being quantized, its embeddings (and head) loaded.
        layers, final, tuple_output: the decoder layers and the last layer's calibration outputs,
            for the head's input Hessian where a tied head shares the table.
        config: the config used (its group size the one stored).
    Returns:
        (GPTQ tensors by model name, `<embedding>.qweight` etc., which replace `<embedding>.weight`;
         {embedding name: its record}: bits, group size, the head that shares it or None, the table's relative error).
    A head that shares the table is recorded as such and `tie_word_embeddings` set off: the
    sharing is llmshrink's (`QuantLinear.tie_to`), there is no `.weight` left for transformers to tie.
    """
    name, embed = input_embedding(model)
    head = head_of(model)
    shared = head is not None and head[1].weight is embed.weight  # still tied: lm_head off
    H = head_hessian(model, layers, final, tuple_output) if shared and config.clip_search else None
    grid = DEFAULT_SHRINK_GRID if config.clip_search else (1.0,)
    weight = embed.weight.data.float()  # [vocab, hidden]
    result = quantize_table(weight, config.embed_bits, config.group_size, config.sym, grid,
                            None if H is None else torch.diag(H))
    packed = pack_gptq(result.codes, result.zeros, result.scales, result.g_idx, config.embed_bits)
    if shared:
        model.config.tie_word_embeddings = False
    record = {"bits": config.embed_bits, "group_size": config.group_size, "sym": config.sym, "embedding": True,
              "tied_head": head[0] if shared else None, "weighted_by": "head hessian" if H is not None else None,
              "rel_error": round(float((result.dequantized - weight).norm() / weight.norm()), 6)}
    return {f"{name}.{k}": v for k, v in packed.items()}, {name: record}
