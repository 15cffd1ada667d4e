"""Load a GPTQ checkpoint (ours or any tool's `checkpoint_format: gptq`) into QuantLinear modules
(and a QuantEmbedding where llmshrink quantized the input embedding)."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from ..arch import checkpoint_names
from ..errors import UsageError
from ..factorize.format import install_from_shapes
from ..kernels import prepare_kernels
from ..kernels.cpu import native_bf16_cpu
from ..safetensors_io import TensorIndex
from .linear import QuantEmbedding, QuantLinear, retie_heads

__all__ = ["default_load_dtype", "log_load_dtype", "load_quantized", "is_gptq_checkpoint", "quant_method",
           "read_quantization_config", "replace_quantized"]

logger = logging.getLogger(__name__)


def quant_method(config) -> str | None:
    """A transformers config's quantization_config quant_method ("gptq", "bitsandbytes", ...), or None."""
    qc = getattr(config, "quantization_config", None)
    qc = qc if isinstance(qc, dict) else (qc.to_dict() if qc is not None else {})
    return None if qc.get("quant_method") is None else str(qc["quant_method"])


def is_gptq_checkpoint(config) -> bool:
    return quant_method(config) == "gptq"


def _dtype_name(dtype) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def _needs_bf16(config) -> bool:
    """Whether a GPTQ checkpoint's config says its model computes in bfloat16: its dtype (tools
    that keep the source's) or the source dtype llmshrink records; float16 may overflow there."""
    qc = getattr(config, "quantization_config", None)
    qc = qc if isinstance(qc, dict) else (qc.to_dict() if qc is not None else {})
    source = (qc.get("llmshrink") or {}).get("source_dtype")
    return "bfloat16" in (_dtype_name(getattr(config, "dtype", None)), source)


def default_load_dtype(config, device: torch.device | str = "cpu") -> tuple[torch.dtype, str]:
    """The compute dtype of a GPTQ checkpoint loaded without `dtype=`, and why (for the log line).

    On CPU never float16 (torch runs it on the slow dequantize path, and activations of some
    model families leave its range: NaN logits): bfloat16 where the CPU multiplies bf16 natively
    (AVX512-BF16 or AMX; torch's int4/int8 weight-only kernels are fast there), else float32. On
    CUDA the checkpoint's dtype, or bfloat16 where its config says the model needs it.
    """
    if torch.device(device).type == "cpu":
        if native_bf16_cpu():
            return torch.bfloat16, "this CPU multiplies bf16 natively, where the int4/int8 kernels are fast"
        return torch.float32, "this CPU has no native bf16 matmul; float16 is slow on CPU and may overflow"
    if _needs_bf16(config):
        return torch.bfloat16, "the model's config says it computes in bfloat16"
    stored = _dtype_name(getattr(config, "dtype", None))
    return (getattr(torch, stored) if stored else torch.float16), "the checkpoint's dtype"


def log_load_dtype(dtype: torch.dtype, device: torch.device | str, why: str) -> None:
    """The one log line of a default load dtype choice."""
    logger.info("llmshrink: GPTQ checkpoint loads in %s on %s (%s); pass dtype= to choose",
                _dtype_name(dtype), torch.device(device).type, why)


def _group_size_for(name: str, qc: dict) -> int:
    for key, overrides in (qc.get("dynamic") or {}).items():
        pattern = key[2:] if key.startswith(("+:", "-:")) else key
        if re.fullmatch(pattern, name) and not key.startswith("-:"):
            return overrides.get("group_size", qc["group_size"])
    return qc["group_size"]


def read_quantization_config(folder: str | os.PathLike) -> dict:
    """config.json's quantization_config in `folder`, as stored (empty when there is none or no
    config). transformers' own GPTQ config object drops the keys it does not know, ours included."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text()).get("quantization_config") or {}
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return {}  # resolve_model's folder check reports a broken config.json before any load


def replace_quantized(model: nn.Module, shapes: dict[str, tuple[int, ...]], qc: dict, dtype: torch.dtype) -> list[str]:
    """Swap in a QuantLinear for every nn.Linear that the checkpoint holds quantized (first a
    FactorizedLinear for every linear stored as two factors, whose V and U are then swapped), a
    QuantEmbedding for a quantized input embedding, and, for a head that shares that embedding
    (recorded under `qc["llmshrink"]["modules"]`), a QuantLinear tied to it (`QuantLinear.tie_to`;
    tie again with `retie_heads` once the weights are loaded).

    Args:
        model: the model skeleton (meta or real weights).
        shapes: checkpoint key -> tensor shape; every `<name>.qweight` marks a quantized module.
        qc: the checkpoint's quantization_config as stored (group sizes, `dynamic` overrides, and
            llmshrink's record of a quantized embedding).
    Returns:
        The names of the replaced modules.
    """
    records = (qc.get("llmshrink") or {}).get("modules") or {}
    install_from_shapes(model, shapes, dtype)  # linears stored as low-rank factors (`<name>.V.*`, `<name>.U.*`)
    names = []
    for key in [k for k in shapes if k.endswith(".qweight")]:
        name = key[: -len(".qweight")]
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise UsageError(f"the checkpoint quantizes {name}, which this model does not have; "
                             "the checkpoint does not match its config") from None
        if not isinstance(module, (nn.Linear, nn.Embedding)):
            raise UsageError(f"{name} is quantized in the checkpoint but is neither a linear nor an embedding in the model")
        group_size = records.get(name, {}).get("group_size", _group_size_for(name, qc))
        if isinstance(module, nn.Embedding):
            bits = shapes[key][0] * 32 // module.embedding_dim
            quant = QuantEmbedding(module.num_embeddings, module.embedding_dim, bits, group_size, dtype=dtype,
                                   padding_idx=module.padding_idx)
        else:
            bits = shapes[key][0] * 32 // module.in_features
            quant = QuantLinear(module.in_features, module.out_features, bits, group_size,
                                bias=f"{name}.bias" in shapes, dtype=dtype)
        _set_module(model, name, quant)
        names.append(name)
        head = records.get(name, {}).get("tied_head") if isinstance(quant, QuantEmbedding) else None
        if head:
            _set_module(model, head, QuantLinear.sharing(quant, bias=f"{head}.bias" in shapes, dtype=dtype))
            names.append(head)
    return names


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def load_quantized(folder: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """A causal LM whose GPTQ-quantized linears are QuantLinear modules (a quantized input
    embedding a QuantEmbedding), on the CPU in eval mode (`llmshrink.AutoModelForCausalLM` passes
    `default_load_dtype` where no dtype is asked for).

    Which modules are quantized is read from the checkpoint itself (every `*.qweight`), their
    bits from the packed shapes, their group size from the config (and its `dynamic` overrides,
    or llmshrink's record of the embedding).
    """
    folder = Path(folder)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    if not is_gptq_checkpoint(config):
        raise UsageError(f"{folder} is not a GPTQ checkpoint (no quantization_config with quant_method 'gptq')")
    qc = config.quantization_config if isinstance(config.quantization_config, dict) else config.quantization_config.to_dict()
    if qc.get("checkpoint_format", "gptq") != "gptq":
        raise UsageError(f"{folder} uses checkpoint_format '{qc['checkpoint_format']}'; only 'gptq' is read")
    del config.quantization_config
    index = TensorIndex(folder)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    names = checkpoint_names(model, index.keys())
    replace_quantized(model, {names[k]: index.shape(k) for k in index.keys()}, qc, dtype)
    state = {}
    for key in index.keys():
        t = index.get(key)
        state[names[key]] = t.to(dtype) if t.is_floating_point() and not key.endswith(".scales") else t
    result = model.load_state_dict(state, strict=False, assign=True)
    retie_heads(model)  # the load replaced the embedding's buffers that a tied head shares
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [k for k in result.missing_keys if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing:
        raise UsageError(f"{folder} lacks {len(missing)} tensors the model needs (first: {missing[0]}); "
                         "the checkpoint is incomplete")
    for name, buf in model.named_buffers():  # non-persistent buffers (rotary tables) built on meta
        if buf.device.type == "meta":
            raise UsageError(f"{name} could not be materialised")
    prepare_kernels(model)
    return model.eval()
