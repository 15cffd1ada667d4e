"""Plain `transformers.AutoModelForCausalLM.from_pretrained` for GPTQ checkpoints, through llmshrink.

transformers maps `quant_method: "gptq"` to its own quantizer, which needs optimum and gptqmodel
installed (and, without gptqmodel, a GPU). Where that quantizer cannot run, `import llmshrink`
registers `LlmshrinkGptqHfQuantizer` for "gptq" in transformers' quantizer registry (the table
`transformers.quantizers.register_quantizer` writes); where it can run, the built-in one is left
in place. Set LLMSHRINK_HF_GPTQ=llmshrink to always use ours, =transformers to never register it.

The quantizer reads which linears are quantized from the checkpoint's own tensors (every
`*.qweight`), swaps in QuantLinear modules (a QuantEmbedding for a quantized input embedding,
and a QuantLinear tied to it for a head that shares it) before the weights load, and lets
transformers load the packed buffers by name.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from transformers.quantizers import HfQuantizer, register_quantizer
from transformers.quantizers import auto as hf_auto
from transformers.utils import is_gptqmodel_available, is_optimum_available

from ..arch import checkpoint_names
from ..errors import UsageError
from ..kernels import prepare_kernels
from ..safetensors_io import TensorIndex
from .linear import retie_heads
from .load import default_load_dtype, log_load_dtype, read_quantization_config, replace_quantized

__all__ = ["LlmshrinkGptqHfQuantizer", "register_with_transformers"]

logger = logging.getLogger(__name__)


class LlmshrinkGptqHfQuantizer(HfQuantizer):
    """Loads `checkpoint_format: gptq` checkpoints into llmshrink QuantLinear modules (CPU or GPU)."""

    requires_calibration = True  # loads quantized checkpoints only; quantize with llmshrink.quantize
    _device_map = None  # as transformers passes it (update_device_map)
    _device = torch.device("cpu")
    _default_dtype: torch.dtype | None = None  # default_load_dtype, set before the dtype is settled
    _why = ""

    def validate_environment(self, *args, **kwargs):
        qc = self.quantization_config.to_dict()
        if qc.get("checkpoint_format", "gptq") != "gptq":
            raise UsageError(f"checkpoint_format '{qc['checkpoint_format']}' is not read by llmshrink; only 'gptq'")

    def update_device_map(self, device_map):
        self._device_map = device_map
        return device_map

    def update_attn_implementation(self, config):
        """transformers' one hook that sees the config before the dtype is settled: the default
        load dtype goes into `config.dtype`, which `dtype="auto"` (what transformers passes when
        the caller gives none) resolves to; an explicit `dtype=` is obeyed as it is."""
        self._device = _device_of(self._device_map)
        self._default_dtype, self._why = default_load_dtype(config, self._device)
        config.dtype = self._default_dtype
        return config

    def update_dtype(self, dtype: torch.dtype) -> torch.dtype:
        if self._default_dtype is not None and dtype in (None, self._default_dtype):
            dtype = self._default_dtype
            log_load_dtype(dtype, self._device, self._why)
        return dtype or torch.float32

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        if not checkpoint_files:
            raise UsageError("a GPTQ checkpoint loads from safetensors files; none were found")
        folder = Path(checkpoint_files[0]).parent
        index = TensorIndex(folder)
        model_name = checkpoint_names(model, index.keys())
        shapes = {model_name[k]: index.shape(k) for k in index.keys()}
        self.modules_to_not_convert = []
        # transformers' config object drops llmshrink's record (a quantized embedding's): read it as stored
        qc = {**self.quantization_config.to_dict(), "llmshrink": read_quantization_config(folder).get("llmshrink", {})}
        replaced = replace_quantized(model, shapes, qc, dtype=model.dtype)
        logger.info("llmshrink: %d GPTQ modules loaded as QuantLinear / QuantEmbedding", len(replaced))

    def _process_model_after_weight_loading(self, model, **kwargs):
        retie_heads(model)  # a head tied to a quantized embedding takes its loaded tensors
        prepare_kernels(model)
        return model

    def is_serializable(self):
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def _device_of(device_map) -> torch.device:
    """The device the weights load to: transformers loads on the CPU without a device_map."""
    if device_map is None:
        return torch.device("cpu")
    if isinstance(device_map, dict):
        devices = {str(d) for d in device_map.values()}
        device_map = next((d for d in devices if d not in ("cpu", "disk")), "cpu")
    if device_map == "auto" or str(device_map).isdigit():
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device_map)


def register_with_transformers() -> bool:
    """Make transformers load GPTQ checkpoints through llmshrink where its own path cannot run.

    Returns whether llmshrink's quantizer now serves "gptq".
    """
    choice = os.environ.get("LLMSHRINK_HF_GPTQ", "auto")
    current = hf_auto.AUTO_QUANTIZER_MAPPING.get("gptq")
    if current is LlmshrinkGptqHfQuantizer:
        return True
    if choice == "transformers" or (choice == "auto" and is_optimum_available() and is_gptqmodel_available()):
        return False
    # register_quantizer refuses a name already taken, so the built-in entry is removed first.
    hf_auto.AUTO_QUANTIZER_MAPPING.pop("gptq", None)
    register_quantizer("gptq")(LlmshrinkGptqHfQuantizer)
    return True
