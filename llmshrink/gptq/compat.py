"""What the readers of GPTQ checkpoints accept, as data: whole groups, and vLLM's limits.

vLLM 0.32 (CPU and GPU) reads symmetric 4- and 8-bit GPTQ with `desc_act: false` (a trivial or
monotone `g_idx`) and whole groups: it allocates `in_features // group_size` scale rows, so a
partial last group (576 inputs with group size 128) fails to load. llmshrink's loader and
GPTQModel read partial groups. Pure functions: the walker and the model card call them.
"""

from __future__ import annotations

import logging

__all__ = ["VLLM_BITS", "whole_group_size", "vllm_limits"]

logger = logging.getLogger(__name__)

VLLM_BITS = (4, 8)  # symmetric only
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


def vllm_limits(modules: dict[str, tuple[int, int, bool, int]], desc_act: bool) -> str | None:
    """Why vLLM cannot serve a checkpoint and what to change, in a sentence, or None if it can.

    Args:
        modules: per quantized linear, (bits, group_size, sym, in_features) as the checkpoint
            stores it (after `dynamic` overrides).
        desc_act: the checkpoint's `desc_act` (a reordering g_idx).
    """
    if desc_act:
        return ("desc_act=True: act-order without static groups reorders g_idx, which vLLM no longer reads; "
                "keep static groups on (the default)")
    for name, (bits, group_size, sym, in_features) in modules.items():
        if bits not in VLLM_BITS:
            return (f"{name} has bits={bits}: vLLM reads {' and '.join(map(str, VLLM_BITS))}-bit GPTQ; use "
                    f"bits {' or '.join(map(str, VLLM_BITS))} for a checkpoint vLLM serves")
        if not sym:
            return f"{name} is asymmetric: vLLM reads symmetric GPTQ only; drop --asym for a checkpoint vLLM serves"
        if group_size != -1 and in_features % group_size:
            return (f"group_size={group_size} leaves {name} ({in_features} inputs) a partial last group, which vLLM "
                    "cannot read; use a group size that divides it, or leave partial_groups off")
    return None
