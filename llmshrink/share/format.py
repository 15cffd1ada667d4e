"""The `shared` folder: a transformers checkpoint of the model's own config in which each shared
linear `<name>` is stored as `<name>.codes` (int32, packed) and `<name>.codebook` (fp16), and
`<name>.bias` where it had one (layout.py).

config.json carries the record (`llmshrink_share`: the config, bits per weight, errors) and
`quantization_config: {quant_method: llmshrink_shared}`, the hook by which transformers, with
llmshrink's quantizer registered (hf.py), builds the SharedLinear modules itself. The model_type
stays the model's own. The bits and the codebook kind (per row or per linear) are read from the
tensors, so the folder describes itself.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..swap import load_swapped, register_swapped_format, save_swapped
from .modules import install_from_shapes

__all__ = ["QUANT_METHOD", "SHARED_FORMAT", "load_shared", "save_shared"]

QUANT_METHOD = "llmshrink_shared"


def save_shared(model, tokenizer, out: str | os.PathLike) -> Path:
    """Write `model` (shared by `share`) and its tokenizer to `out`, whole or not at all."""
    return save_swapped(model, tokenizer, out, QUANT_METHOD)


def load_shared(folder: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """The model of a shared folder, its shared linears SharedLinear modules (codebooks kept in
    fp16), on the CPU in eval mode; no dense weight of a shared linear is ever built."""
    return load_swapped(folder, install_from_shapes, dtype, "shared")


SHARED_FORMAT = register_swapped_format(
    "shared", QUANT_METHOD, install_from_shapes,
    refusal="{name} cannot follow {before}: its linears are stored as codes into shared values, not weights; "
            "put {method} before share (only pack may follow it)")
