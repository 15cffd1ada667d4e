"""Plain `transformers.AutoModelForCausalLM.from_pretrained` for GPTQ checkpoints, through llmshrink.

transformers maps `quant_method: "gptq"` to its own quantizer, which needs optimum and gptqmodel
installed (and, without gptqmodel, a GPU). Where that quantizer cannot run, `import llmshrink`
registers `LlmshrinkGptqHfQuantizer` for "gptq" in transformers' quantizer registry (the table
`transformers.quantizers.register_quantizer` writes); where it can run, the built-in one is left
in place. Set LLMSHRINK_HF_GPTQ=llmshrink to always use ours, =transformers to never register it.

The quantizer reads which linears are quantized from the checkpoint's own tensors (every
`*.qweight`), swaps in QuantLinear modules before the weights load, and lets transformers load
the packed buffers by name.
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
from ..safetensors_io import TensorIndex
from .load import replace_linears

__all__ = ["LlmshrinkGptqHfQuantizer", "register_with_transformers"]

logger = logging.getLogger(__name__)


class LlmshrinkGptqHfQuantizer(HfQuantizer):
    """Loads `checkpoint_format: gptq` checkpoints into llmshrink QuantLinear modules (CPU or GPU)."""

    requires_calibration = True  # loads quantized checkpoints only; quantize with llmshrink.quantize

    def validate_environment(self, *args, **kwargs):
        qc = self.quantization_config.to_dict()
        if qc.get("checkpoint_format", "gptq") != "gptq":
            raise UsageError(f"checkpoint_format '{qc['checkpoint_format']}' is not read by llmshrink; only 'gptq'")

    def update_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return dtype or torch.float16

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        if not checkpoint_files:
            raise UsageError("a GPTQ checkpoint loads from safetensors files; none were found")
        index = TensorIndex(Path(checkpoint_files[0]).parent)
        model_name = checkpoint_names(model, index.keys())
        shapes = {model_name[k]: index.shape(k) for k in index.keys()}
        self.modules_to_not_convert = []
        replaced = replace_linears(model, shapes, self.quantization_config.to_dict(), dtype=model.dtype)
        logger.info("llmshrink: %d GPTQ linears loaded as QuantLinear", len(replaced))

    def _process_model_after_weight_loading(self, model, **kwargs):
        from ..kernels import prepare_kernels

        prepare_kernels(model)
        return model

    def is_serializable(self):
        return True

    @property
    def is_trainable(self) -> bool:
        return False


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
