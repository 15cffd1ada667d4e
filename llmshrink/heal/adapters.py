"""LoRA adapters (peft) on any llmshrink model, GPTQ checkpoints included.

peft wraps `nn.Linear` (and bitsandbytes' layers) by itself. A GPTQ checkpoint loads into
llmshrink's `QuantLinear`, which peft does not know: `lora_config` registers it through peft's
custom-module mechanism with peft's own GPTQ LoRA layer (`GPTQLoraLinear`: y = base(x) +
B(A(x)) * scaling over any quantized linear), and expands `all-linear` (which peft resolves to
`nn.Linear` only) to the names of the quantized linears too. The quantized weights stay frozen
and packed; `QuantLinear` gives the gradient to its input, so every adapter trains.

A saved adapter is a plain peft folder (adapter_config.json + adapter_model.safetensors).
`load_adapter` puts one back on its base after checking it fits, and
`llmshrink.AutoModelForCausalLM.from_pretrained(ADAPTER_DIR)` loads the recorded base (plain,
GPTQ, packed, ...) and the adapter in one call.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from ..errors import UsageError
from ..gptq.linear import QuantLinear

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "adapter_base", "adapter_mismatch", "add_lora", "is_adapter_folder",
           "load_adapter", "lora_config"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _targets(model: nn.Module, target_modules: str | list[str]) -> str | list[str]:
    """peft target_modules for `model`: `all-linear` becomes the leaf names of every linear,
    quantized or not, apart from the output head, when the model holds quantized linears."""
    if target_modules != "all-linear" or not any(isinstance(m, QuantLinear) for m in model.modules()):
        return target_modules
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                   if isinstance(m, (nn.Linear, QuantLinear)) and m is not head})


def lora_config(model: nn.Module, rank: int, lora_alpha: int, lora_dropout: float = 0.0,
                target_modules: str | list[str] = "all-linear"):
    """A peft `LoraConfig` for `model`, with llmshrink's QuantLinear registered as a LoRA base layer."""
    from peft import LoraConfig  # lazy: peft adds seconds to `import llmshrink`

    config = LoraConfig(r=rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                        target_modules=_targets(model, target_modules), task_type="CAUSAL_LM")
    return _register_quantized(config)


def _register_quantized(config):
    from peft.tuners.lora.gptq import GPTQLoraLinear  # lazy: peft internals, slow to import

    config._register_custom_module({QuantLinear: GPTQLoraLinear})
    return config


def add_lora(model: nn.Module, config):
    """peft's `get_peft_model`, without its warning that a registered custom layer type (QuantLinear) is unknown."""
    from peft import get_peft_model  # lazy: peft adds seconds to `import llmshrink`

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Unsupported layer type .*QuantLinear", category=UserWarning)
        return get_peft_model(model, config)


def is_adapter_folder(path: str | os.PathLike) -> bool:
    """A folder holding a peft adapter and no model config of its own (a merged heal output has both)."""
    path = Path(path)
    return (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file()


def adapter_base(adapter: str | os.PathLike) -> str | None:
    """The base model the adapter records (peft's base_model_name_or_path), or None."""
    return json.loads((Path(adapter) / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")


def adapter_mismatch(model: nn.Module, adapter: str | os.PathLike, resolved: str,
                     check_base: bool = True) -> str | None:
    """Why the peft adapter in `adapter` does not fit the peft-wrapped `model` (loaded from
    `resolved`), or None: another recorded base (unless not `check_base`), a tensor the model
    lacks or of another shape."""
    adapter = Path(adapter)
    if not (adapter / ADAPTER_CONFIG).is_file():
        return f"{adapter} has no {ADAPTER_CONFIG}"
    base = adapter_base(adapter)
    if check_base and base and os.path.realpath(base) != os.path.realpath(resolved) and base != resolved:
        return f"the adapter in {adapter} was trained on {base}, not {resolved}"
    params = dict(model.named_parameters())
    with safe_open(str(adapter / ADAPTER_WEIGHTS), "pt") as f:
        for key in f.keys():
            name = key.replace(".lora_A.weight", ".lora_A.default.weight")
            name = name.replace(".lora_B.weight", ".lora_B.default.weight")
            shape = tuple(f.get_slice(key).get_shape())
            if name not in params:
                return f"the adapter in {adapter} has {key}, which {resolved} does not have"
            if tuple(params[name].shape) != shape:
                return f"the adapter's {key} is {list(shape)} but {resolved} needs {list(params[name].shape)}"
    return None


def load_adapter(model: nn.Module, adapter: str | os.PathLike, resolved: str, check_base: bool = True):
    """`model` (loaded from `resolved`) wrapped by peft with the saved adapter's weights, in eval mode.

    Raises UsageError when the adapter was made for another model (by its recorded base, unless
    not `check_base`, and by its tensors' names and shapes)."""
    from peft import LoraConfig, set_peft_model_state_dict  # lazy: peft adds seconds to `import llmshrink`

    adapter = Path(adapter)
    if not (adapter / ADAPTER_CONFIG).is_file():
        raise UsageError(f"{adapter} has no {ADAPTER_CONFIG}; give a folder written by 'llmshrink heal'")
    config = LoraConfig.from_pretrained(str(adapter))
    config.base_model_name_or_path = None  # checked below, not renamed by peft
    peft_model = add_lora(model, _register_quantized(config))
    why = adapter_mismatch(peft_model, adapter, resolved, check_base)
    if why:
        raise UsageError(f"cannot load the adapter: {why}; give the model the adapter was trained on")
    set_peft_model_state_dict(peft_model, load_file(str(adapter / ADAPTER_WEIGHTS)))
    return peft_model.eval()
