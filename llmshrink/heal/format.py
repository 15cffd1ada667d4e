"""The adapter format: a peft LoRA folder (what `llmshrink heal` writes without --merge) loads on
top of the base model it records, itself loaded by whatever format that base is."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UsageError
from ..formats import Format, LoadRequest, register_format, weight_bytes
from ..models import resolve_model
from .adapters import adapter_base, is_adapter_folder, load_adapter

__all__ = ["ADAPTER_FORMAT"]


def _load(folder: Path, request: LoadRequest):
    base = request.base_model or adapter_base(folder)
    if not base:
        raise UsageError(f"the adapter in {request.name} does not record its base model; pass base_model=")
    base_resolved = resolve_model(base)
    # float32 unless asked: the default dtype rule is for GPTQ checkpoints loaded as they are
    base_loaded = request.load(base_resolved, dtype=request.dtype or torch.float32, token=request.token,
                               **request.kwargs)
    return load_adapter(base_loaded, folder, base_resolved, check_base=request.base_model is None)


def _weight_bytes(folder: Path) -> int:
    """The adapter's own files plus its base's weights, where the base is a local folder."""
    own = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and p.name.endswith((".safetensors", ".bin")))
    base = adapter_base(folder)
    return own + (weight_bytes(base) if base and Path(base).is_dir() else 0)


ADAPTER_FORMAT = register_format(Format(
    name="adapter", priority=30, detect=is_adapter_folder, load=_load, weight_bytes=_weight_bytes,
    describe=lambda folder: ("peft", ["lora", "peft"]), transformers_loads=False,
    refusal="{name} follows a heal step that writes an adapter; set merge: true on that heal step so later "
            "steps get a full model"))
