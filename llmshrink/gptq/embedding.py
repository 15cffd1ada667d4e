"""Quantize the input embedding into GPTQ tensors (`GPTQConfig.embed_bits`).

The table E [vocab, hidden] is quantized as the linear a tied head computes with (out=vocab,
in=hidden) would be, on the config's grid (bits=embed_bits, its whole-groups group size, sym),
and packed by `pack_gptq` under the embedding's own name (`model.embed_tokens.qweight`
[hidden*bits/32, vocab], `.qzeros`, `.scales`, `.g_idx`) with no `.weight`. `QuantEmbedding`
(linear.py) reads it back.

How it is solved depends on who reads it:
- a table no head reads (an untied model, or `lm_head` on: the head was untied and quantized
  on its own before this runs) is rounded to nearest with the range search, unweighted: nothing
  calibrates its use as the first layer's input;
- a table the output head shares (tied, `lm_head` off) is stored once and every logit depends
  on it through the head's inputs, so it is solved as that head with the head's input Hessian
  (`layers.head_hessian`) by the config's algorithm: GPTQ, or, for `algorithm="rtn"`, round to
  nearest with the range search weighted by the Hessian's diagonal. The Hessian is damped ten
  times more than the linears' (TIED_DAMP), which pulls GPTQ toward plain rounding, better for
  the table's other reader, the first layer, about which the head's Hessian says nothing.

Measured on the packaged SmolLM2-135M (4-bit layers, the tied table at 4 bits, group size 64;
wiki ppl on 40 held-out windows of 512, bf16; fp16 table 23.586), as checkpoints: unweighted RTN
28.270, RTN weighted by the head Hessian's diagonal 26.284, GPTQ with the head Hessian at the
linears' damp 0.01 25.068, at TIED_DAMP 24.893. Damp swept on the decoded table swapped into the
dense model: 0.01 25.047, 0.05 24.934, 0.1 24.869, 0.2 24.917, 0.5 25.008; on 40 further windows
(fp16 25.908) 0.01 27.480, 0.1 27.342. At 8 bits every variant lies within 0.03 of the fp16
table (23.566 to 23.596), flattered by its origin: a Q8_0 GGUF tensor.

`quantize_table` is the math on plain tensors; `check_embedding` refuses before any work what
cannot be done; `quantize_embedding` finds the table in the model and records what it did.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..errors import UsageError
from .algorithm import QuantResult
from .config import ALGORITHMS, GPTQConfig
from .layers import head_hessian, head_of
from .packing import STREAM_BITS, pack_gptq

__all__ = ["TIED_DAMP", "check_embedding", "input_embedding", "quantize_embedding", "quantize_table"]

TIED_DAMP = 0.1  # damp_percent of a tied table's GPTQ solve (see above)


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
    fits = [b for b in STREAM_BITS if vocab * b % 32 == 0 and hidden * b % 32 == 0]
    if config.embed_bits not in fits:
        fix = f"use embed_bits {' or '.join(map(str, fits))}" if fits else "leave embed_bits off"
        raise UsageError(f"{name} ({vocab}x{hidden}) cannot be packed at {config.embed_bits} bits (the vocabulary and "
                         f"width times the bits must be multiples of 32); {fix}")


def quantize_table(weight: torch.Tensor, H: torch.Tensor | None, config: GPTQConfig) -> QuantResult:
    """Quantize an embedding table `weight` [vocab, hidden] at `config.embed_bits` as the linear
    out=vocab, in=hidden, on the config's grid (group size, sym, range search).

    Args:
        weight: the table.
        H: [hidden, hidden] Hessian of a tied head's inputs, or None where no head reads the table
            (or no activations were kept): round to nearest, unweighted.
        config: the checkpoint's config (its algorithm solves a tied table, damped by TIED_DAMP).
    """
    table = dataclasses.replace(config, damp_percent=TIED_DAMP, dynamic={}, target_bits=None)
    table.bits = config.embed_bits  # set after validation: a table may take widths no GPTQ linear does
    solver = config.solver if H is not None else ALGORITHMS["rtn"]
    return solver.quantize(weight, H, table)


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
         {embedding name: its record}: bits, group size, the head that shares it or None, how it
         was solved, its loss and relative error).
    A head that shares the table is recorded as such and `tie_word_embeddings` set off: the
    sharing is llmshrink's (`QuantLinear.tie_to`), there is no `.weight` left for transformers to tie.
    """
    name, embed = input_embedding(model)
    head = head_of(model)
    shared = head is not None and head[1].weight is embed.weight  # still tied: lm_head off
    H = head_hessian(model, layers, final, tuple_output) if shared else None  # None without activations
    weight = embed.weight.data.float()  # [vocab, hidden]
    result = quantize_table(weight, H, config)
    packed = pack_gptq(result.codes, result.zeros, result.scales, result.g_idx, config.embed_bits)
    if shared:
        model.config.tie_word_embeddings = False
    record = {"bits": config.embed_bits, "group_size": config.group_size, "sym": config.sym, "embedding": True,
              "tied_head": head[0] if shared else None,
              "solved": f"{config.algorithm} with the head's input Hessian" if H is not None else "rtn, unweighted",
              "loss": round(float(result.loss), 6),
              "rel_error": round(float((result.dequantized - weight).norm() / weight.norm()), 6)}
    return {f"{name}.{k}": v for k, v in packed.items()}, {name: record}
