"""The source model of a quantize run, read the way the walker needs it: an empty (meta) model of
its config, what lies outside the decoder layers loaded once, each layer loaded when its turn comes."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from transformers import AutoConfig, AutoModelForCausalLM

from ..arch import checkpoint_names, layer_linears
from ..errors import UsageError
from ..factorize.format import QUANT_METHOD as FACTORIZED, install_from_shapes
from ..factorize.modules import factorized_modules
from ..safetensors_io import TensorIndex
from ..swap import folder_quant_method
from .layers import head_of

__all__ = ["all_linears", "check_factorized_source", "check_finite", "empty_model", "factor_multiple", "load_into",
           "load_outside_layers", "pad_factors"]


def check_finite(index: TensorIndex) -> None:
    """Every floating tensor of the source is finite, checked before any work (one tensor at a time)."""
    for key in index.keys():
        if index.dtype_name(key) in ("F64", "F32", "F16", "BF16"):
            tensor = index.get(key)
            if not torch.isfinite(tensor).all():
                raise UsageError(f"{key} holds NaN or Inf values (in {index.folder}); the model cannot be "
                                 "quantized until they are fixed")
    index.release()


def empty_model(folder: Path, index: TensorIndex):
    """The model of `folder`'s config, its weights on the meta device, in eval mode. A factorized
    folder's low-rank linears are FactorizedLinear modules, whose two factors GPTQ quantizes as
    linears of their own (`arch.layer_linears(..., factors=True)`)."""
    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    method = None
    if getattr(config, "quantization_config", None):
        method = config.quantization_config.get("quant_method", "?") if isinstance(config.quantization_config, dict) \
            else getattr(config.quantization_config, "quant_method", "?")
        if method == "llmshrink_shared":
            raise UsageError(f"{folder} is already weight-shared (codes and codebooks); quantize the original "
                             "full-precision model")
        if method != FACTORIZED:
            raise UsageError(f"{folder} is already quantized ({method}); quantize the original full-precision model")
        del config.quantization_config
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if method == FACTORIZED:
        names = checkpoint_names(model, index.keys())
        install_from_shapes(model, {names[k]: index.shape(k) for k in index.keys()}, torch.float32)
    return model.eval()


def check_factorized_source(folder: Path, config) -> None:
    """What GPTQ cannot do on a factorized folder, refused before any work: planning widths
    (target_bits) and rotating both assume dense linears."""
    if folder_quant_method(folder) != FACTORIZED:
        return
    if config.target_bits is not None:
        raise UsageError(f"target_bits plans widths for dense linears; {folder} is factorized: give --bits, or "
                         "quantize a merged model (factorize --merge)")
    if config.rotate is not None:
        raise UsageError(f"rotate={config.rotate!r} rotates dense linears; {folder} is factorized: quantize it "
                         "without rotate, or rotate before factorizing")


def factor_multiple(config, name: str) -> int:
    """The rank granularity the factors of factorized linear `name` need to be packed: GPTQ packs
    codes in 32-bit words along both widths, so a rank r at b bits needs r * b % 32 == 0."""
    multiple = 1
    for factor in ("V", "U"):
        mconf = config.for_module(f"{name}.{factor}")
        if mconf is not None:
            multiple = math.lcm(multiple, 32 // math.gcd(mconf.bits, 32))
    return multiple


def pad_factors(layer: torch.nn.Module, prefix: str, config) -> None:
    """Grow the rank of each loaded FactorizedLinear of `layer` (model names `prefix` + name) to
    what packing needs (`factor_multiple`), with zeros: the layer computes the same."""
    for name, module in factorized_modules(layer).items():
        module.pad_rank(factor_multiple(config, prefix + name))


def load_into(module: torch.nn.Module, prefix: str, index: TensorIndex, key_of: dict[str, str],
               skip: str | None = None) -> None:
    """Load the tensors of `module` (model names `prefix` + name; `key_of` maps model names to
    checkpoint keys), except names under `skip`."""
    for name, _ in list(module.named_parameters()) + list(module.named_buffers()):
        if skip and name.startswith(skip):
            continue
        key = key_of.get(f"{prefix}{name}")
        if key is None:
            continue  # tied or non-persistent; handled by the caller
        tensor = index.get(key)
        set_module_tensor_to_device(module, name, "cpu", value=tensor.float() if tensor.is_floating_point() else tensor)


def load_outside_layers(model, source: Path, index: TensorIndex, key_of: dict[str, str], layer_prefix: str) -> None:
    """Load what lies outside the decoder layers (embeddings, final norm, head), kept throughout,
    rounded to fp16 as it is saved so calibration sees the stored values."""
    load_into(model, "", index, key_of, skip=layer_prefix)
    for name, p in model.named_parameters():
        if not name.startswith(layer_prefix) and p.device.type != "meta":
            p.data = p.data.to(torch.float16).float()
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta" and not n.startswith(layer_prefix)]
    if missing:
        raise UsageError(f"{source} lacks {missing[0]}; the checkpoint does not match its config")


def all_linears(model, layers, spec, layer_prefix: str) -> dict[str, torch.nn.Linear]:
    """Every linear the walker visits (decoder layers' in step order, then the head), by model name."""
    found = {f"{layer_prefix}{i}.{name}": module for i, layer in enumerate(layers)
             for step in layer_linears(layer, spec, factors=True) for name, module in step}
    head = head_of(model)
    if head is not None:
        found[head[0]] = head[1]
    return found
