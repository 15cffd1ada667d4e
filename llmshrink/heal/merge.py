"""Merging a LoRA adapter into its base: a full fp32 transformers checkpoint.

A GPTQ checkpoint's packed weights cannot absorb an adapter; such an adapter stays an adapter.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from ..errors import UsageError
from ..io import atomic_dir, prepare_out
from ..models import resolve_model
from .adapters import load_adapter
from ..swap import mark_swapped
from .load import FACTORIZED, load_tokenizer, quantization

__all__ = ["NO_MERGE", "merge_adapter", "merge_into", "save_trained"]

NO_MERGE = ("{model} is a quantized checkpoint, whose packed weights cannot absorb an adapter; keep the adapter "
            "(no --merge) and load it with llmshrink.AutoModelForCausalLM.from_pretrained(OUT), or heal the "
            "unquantized model and quantize the merged result")


def merge_into(resolved: str, trained, adapter: Path, method: str, dest: Path) -> None:
    """Save the merged full model into `dest`. LoRA: merge the trained fp32 model in place.
    QLoRA: reload the base unquantized in fp32 and merge the saved adapter into it."""
    from peft import PeftModel  # lazy: peft adds seconds to `import llmshrink`

    if method == "qlora":
        base = AutoModelForCausalLM.from_pretrained(resolved, dtype=torch.float32)
        trained = PeftModel.from_pretrained(base, adapter)
    save_trained(resolved, trained.merge_and_unload(), None, dest)  # merged into both factors: still low-rank


def save_trained(resolved: str, trained, state_dict: dict | None, dest: Path) -> None:
    """Save a trained model (heal's `full`, or a merged adapter) into `dest`, in the format of its
    input `resolved` (a factorized input stays factorized: its factors were trained as they are)."""
    trained.save_pretrained(dest, state_dict=state_dict)
    if quantization(resolved) == FACTORIZED:
        mark_swapped(dest, FACTORIZED)


def merge_adapter(model: str | os.PathLike, adapter: str | os.PathLike, out: str | os.PathLike,
                  overwrite: bool = False) -> Path:
    """Merge a saved peft adapter into its base (loaded in fp32) and save the full model.

    Args:
        model: the base the adapter was trained on (alias or folder).
        adapter: a folder holding adapter_config.json + adapter_model.safetensors.
        out: folder to write (a plain transformers checkpoint + tokenizer), atomically.
        overwrite: replace a non-empty `out`.
    Returns:
        `out`.
    """
    out, adapter = prepare_out(out, overwrite), Path(adapter)
    resolved = resolve_model(model)
    if quantization(resolved) is not None:
        raise UsageError(NO_MERGE.format(model=resolved))
    tokenizer = load_tokenizer(resolved)
    try:
        peft_model = load_adapter(AutoModelForCausalLM.from_pretrained(resolved, dtype=torch.float32), adapter,
                                  resolved)
    except UsageError as e:
        raise UsageError(str(e).replace("cannot load the adapter", "cannot merge")) from None
    merged = peft_model.merge_and_unload()
    with atomic_dir(out) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out
