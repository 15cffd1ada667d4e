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

import json
import os
from pathlib import Path

import torch
from accelerate import init_empty_weights
from transformers import AutoConfig, AutoModelForCausalLM

from ..arch import checkpoint_names
from ..errors import UsageError
from ..formats import Format, LoadRequest, register_format
from ..io import atomic_dir
from ..safetensors_io import TensorIndex
from .apply import RECORD
from .modules import install_factorized

__all__ = ["FACTORIZED_FORMAT", "QUANT_METHOD", "factor_ranks", "is_factorized_folder", "load_factorized",
           "save_factorized"]

QUANT_METHOD = "llmshrink_factorized"


def factor_ranks(shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
    """Module name -> rank, for every `<name>.V.weight` among the checkpoint's (model-named) tensors."""
    return {key[: -len(".V.weight")]: shape[0] for key, shape in shapes.items() if key.endswith(".V.weight")}


def is_factorized_folder(folder: str | os.PathLike) -> bool:
    path = Path(folder) / "config.json"
    if not path.is_file():
        return False
    try:
        qc = json.loads(path.read_text()).get("quantization_config") or {}
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False  # the dense format's loader reports a broken config.json
    return isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD


def save_factorized(model, tokenizer, out: str | os.PathLike) -> Path:
    """Write `model` (factorized by `factorize`, or merged) and its tokenizer to `out`, whole or not at all."""
    out = Path(out)
    merged = getattr(model.config, RECORD, {}).get("merged", True)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if not merged:
            path = tmp / "config.json"
            config = json.loads(path.read_text())
            config["quantization_config"] = {"quant_method": QUANT_METHOD}
            path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


def load_factorized(folder: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """The model of a factorized folder, its factorized linears FactorizedLinear modules, on the
    CPU in eval mode (one tensor read at a time; no dense weight is ever built)."""
    folder = Path(folder)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    index = TensorIndex(folder)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    names = checkpoint_names(model, index.keys())
    install_factorized(model, factor_ranks({names[k]: index.shape(k) for k in index.keys()}), dtype)
    state = {names[k]: (t.to(dtype) if t.is_floating_point() else t) for k in index.keys() for t in [index.get(k)]}
    result = model.load_state_dict(state, strict=False, assign=True)
    index.release()
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [k for k in result.missing_keys if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or result.unexpected_keys:
        extra = result.unexpected_keys
        what = f"lacks {len(missing)} tensors the model needs (first: {missing[0]})" if missing else \
            f"holds {len(extra)} tensors the model has no place for (first: {extra[0]})"
        raise UsageError(f"{folder} {what}; the factorized checkpoint does not match its config")
    for name, buf in model.named_buffers():  # non-persistent buffers (rotary tables) built on meta
        if buf.device.type == "meta":
            raise UsageError(f"{name} of {folder} could not be materialised")
    return model.eval()


def _load(folder: Path, request: LoadRequest):
    if request.base_model is not None:
        raise UsageError(f"base_model= is for delta and adapter folders; {request.name} is neither")
    if request.kwargs:
        raise UsageError(f"options {', '.join(request.kwargs)} are not supported for factorized checkpoints")
    return load_factorized(folder, dtype=request.dtype or torch.float32)


FACTORIZED_FORMAT = register_format(Format(
    name="factorized", priority=40, detect=is_factorized_folder, load=_load,
    describe=lambda folder: ("transformers", ["factorized"]),  # + the method's "low-rank" tag
    refusal="{name} cannot follow {before}: its linears are stored as low-rank factors; set merge: true on "
            "{before} so later steps get a dense model"))
