"""Plain `transformers.AutoModelForCausalLM.from_pretrained` for factorized folders, through llmshrink.

A factorized folder's config.json says `quantization_config: {quant_method: llmshrink_factorized}`.
`register_with_transformers()` registers that method in transformers' quantizer registry (its
public `register_quantization_config` / `register_quantizer`): before the weights load, the
quantizer swaps a FactorizedLinear of the stored rank in for every linear whose `<name>.V.weight`
the checkpoint holds, and transformers loads the factors by name. Nothing is quantized; this is
the hook transformers offers for "these modules are built differently before loading".

Without it, transformers (5.24) only warns ("Unknown quantization type, got llmshrink_factorized
... we will skip the quantization") and gives the factorized linears fresh random weights (its
load report lists them MISSING): such a folder must be loaded through llmshrink, or after
`import llmshrink.factorize`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers import auto as hf_auto
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..arch import checkpoint_names
from ..errors import UsageError
from ..safetensors_io import TensorIndex
from .format import QUANT_METHOD, factor_ranks
from .modules import install_factorized

__all__ = ["FactorizedQuantizationConfig", "LlmshrinkFactorizedHfQuantizer", "register_with_transformers"]

logger = logging.getLogger(__name__)


class FactorizedQuantizationConfig(QuantizationConfigMixin):
    """`quantization_config` of a factorized folder; the ranks are read from the tensors."""

    def __init__(self, **kwargs):
        self.quant_method = QUANT_METHOD

    def to_dict(self) -> dict:
        return {"quant_method": QUANT_METHOD}


class LlmshrinkFactorizedHfQuantizer(HfQuantizer):
    """Builds the FactorizedLinear modules of a factorized folder before its weights load."""

    requires_calibration = True  # loads factorized folders only; make them with llmshrink factorize

    def validate_environment(self, *args, **kwargs):
        pass

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        if not checkpoint_files:
            raise UsageError("a factorized checkpoint loads from safetensors files; none were found")
        index = TensorIndex(Path(checkpoint_files[0]).parent)
        names = checkpoint_names(model, index.keys())
        ranks = factor_ranks({names[k]: index.shape(k) for k in index.keys()})
        self.modules_to_not_convert = []
        install_factorized(model, ranks, model.dtype)
        logger.info("llmshrink: %d factorized linears loaded as FactorizedLinear", len(ranks))

    def _process_model_after_weight_loading(self, model, **kwargs):
        return model

    def is_serializable(self):
        return True

    @property
    def is_trainable(self) -> bool:
        return True  # the factors are ordinary nn.Linear weights


def register_with_transformers() -> None:
    """Make transformers load factorized folders (idempotent)."""
    if hf_auto.AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is LlmshrinkFactorizedHfQuantizer:
        return
    register_quantization_config(QUANT_METHOD)(FactorizedQuantizationConfig)
    register_quantizer(QUANT_METHOD)(LlmshrinkFactorizedHfQuantizer)
