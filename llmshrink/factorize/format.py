"""The `factorized` folder: a transformers checkpoint of the model's own config in which each
factorized linear `<name>` is stored as its two factors `<name>.V.weight` [rank, in] and
`<name>.U.weight` [out, rank] (`<name>.U.bias` where the linear had a bias).

config.json carries the record (`llmshrink_factorize`: ranks, the linears kept dense, parameters,
errors, the config) and `quantization_config: {quant_method: llmshrink_factorized}`, the hook by
which transformers, with llmshrink's quantizer registered (hf.py), builds the factors itself. The
model_type stays the model's own, so every reader of config.json (context length, vocabulary)
works as before. The ranks are read from the tensors, so the folder describes itself. A merged
folder (`merge`) is an ordinary dense checkpoint that keeps the record.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..swap import folder_quant_method, load_swapped, register_swapped_format, save_swapped
from .apply import RECORD
from .modules import install_factorized

__all__ = ["FACTORIZED_FORMAT", "QUANT_METHOD", "factor_ranks", "install_from_shapes", "is_factorized_folder",
           "load_factorized", "save_factorized"]

QUANT_METHOD = "llmshrink_factorized"


def factor_ranks(shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
    """Module name -> rank, for every `<name>.V.weight` [rank, in] among the checkpoint's
    (model-named) tensors, and every GPTQ-quantized V factor `<name>.V.qweight` [in * bits / 32, rank]."""
    ranks = {key[: -len(".V.weight")]: shape[0] for key, shape in shapes.items() if key.endswith(".V.weight")}
    ranks.update({key[: -len(".V.qweight")]: shape[1] for key, shape in shapes.items() if key.endswith(".V.qweight")})
    return ranks


def install_from_shapes(model: nn.Module, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype) -> int:
    """Empty FactorizedLinear modules for the factors among the checkpoint's tensor `shapes`."""
    ranks = factor_ranks(shapes)
    install_factorized(model, ranks, dtype)
    return len(ranks)


def is_factorized_folder(folder: str | os.PathLike) -> bool:
    return folder_quant_method(folder) == QUANT_METHOD


def save_factorized(model, tokenizer, out: str | os.PathLike) -> Path:
    """Write `model` (factorized by `factorize`, or merged) and its tokenizer to `out`, whole or not at all."""
    merged = getattr(model.config, RECORD, {}).get("merged", True)
    return save_swapped(model, tokenizer, out, None if merged else QUANT_METHOD)


def load_factorized(folder: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """The model of a factorized folder, its factorized linears FactorizedLinear modules, on the
    CPU in eval mode (one tensor read at a time; no dense weight is ever built)."""
    return load_swapped(folder, install_from_shapes, dtype, "factorized")


FACTORIZED_FORMAT = register_swapped_format(  # described as "factorized", + the method's "low-rank" tag
    "factorized", QUANT_METHOD, install_from_shapes,
    refusal="{name} cannot follow {before}: its linears are stored as low-rank factors; set merge: true on "
            "{before} so later steps get a dense model")
