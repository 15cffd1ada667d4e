"""What the readers of GPTQ checkpoints accept, as data: whole groups, and vLLM's limits.

vLLM 0.32 reads symmetric GPTQ with `desc_act: false` (a trivial or monotone `g_idx`) and whole
groups: it allocates `in_features // group_size` scale rows, so a partial last group (576 inputs
with group size 128) fails to load. Its GPU kernels read 4- and 8-bit, its CPU kernel
(CPUWNA16) 4-bit only; it reads no quantized input embedding (GPTQModel neither). llmshrink's loader and GPTQModel read all of these. Pure functions: the
walker and the model card call them.
"""

from __future__ import annotations

import logging

__all__ = ["VLLM_BITS", "VLLM_CPU_BITS", "whole_group_size", "vllm_limits"]

logger = logging.getLogger(__name__)

VLLM_BITS = (4, 8)  # symmetric only
VLLM_CPU_BITS = (4,)
MIN_GROUP = 32  # smaller groups cost more in scales than they give back


def whole_group_size(group_size: int, in_features: list[int]) -> int:
    """The group size to use so that every linear has whole groups: `group_size` if it divides
    every width, else the largest of group_size / 2, / 4, ... (at least MIN_GROUP) that does, else
    `group_size` unchanged (partial last groups). -1 (one group per row) always fits."""
    if group_size == -1:
        return -1
    size = group_size
    while size >= MIN_GROUP:
        if all(n % size == 0 for n in in_features):
            return size
        if size % 2:
            break
        size //= 2
    return group_size


def vllm_limits(modules: dict[str, tuple[int, int, bool, int]], desc_act: bool, cpu: bool = False,
                embed_bits: int | None = None) -> str | None:
    """Why vLLM (on GPUs; with `cpu`, its CPU backend) cannot serve a checkpoint and what to
    change, in a sentence, or None if it can.

    Args:
        modules: per quantized linear, (bits, group_size, sym, in_features) as the checkpoint
            stores it (after `dynamic` overrides).
        desc_act: the checkpoint's `desc_act` (a reordering g_idx).
        embed_bits: the bits of a quantized input embedding (GPTQConfig.embed_bits), or None.
    """
    if embed_bits is not None:
        return (f"embed_bits={embed_bits} quantizes the input embedding, which vLLM (and GPTQModel) cannot read; "
                "leave embed_bits off for a checkpoint vLLM serves")
    if desc_act:
        return ("desc_act=True: act-order without static groups reorders g_idx, which vLLM no longer reads; "
                "keep static groups on (the default)")
    allowed = VLLM_CPU_BITS if cpu else VLLM_BITS
    for name, (bits, group_size, sym, in_features) in modules.items():
        if bits not in allowed:
            where = "vLLM's CPU kernels read" if cpu else "vLLM reads"
            return (f"{name} has bits={bits}: {where} {' and '.join(map(str, allowed))}-bit GPTQ; use "
                    f"bits {' or '.join(map(str, allowed))} for a checkpoint it serves")
        if not sym:
            return f"{name} is asymmetric: vLLM reads symmetric GPTQ only; drop --asym for a checkpoint vLLM serves"
        if group_size != -1 and in_features % group_size:
            return (f"group_size={group_size} leaves {name} ({in_features} inputs) a partial last group, which vLLM "
                    "cannot read; use a group size that divides it, or leave partial_groups off")
    return None
