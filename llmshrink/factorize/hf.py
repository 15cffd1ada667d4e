"""Plain `transformers.AutoModelForCausalLM.from_pretrained` for factorized folders, through llmshrink.

A factorized folder's config.json says `quantization_config: {quant_method: llmshrink_factorized}`.
`register_with_transformers()` registers that method in transformers' quantizer registry
(llmshrink.swap): before the weights load, the quantizer swaps a FactorizedLinear of the stored
rank in for every linear whose `<name>.V.weight` the checkpoint holds, and transformers loads the
factors by name.

Without it, transformers (5.24) only warns ("Unknown quantization type, got llmshrink_factorized
... we will skip the quantization") and gives the factorized linears fresh random weights (its
load report lists them MISSING): such a folder must be loaded through llmshrink, or after
`import llmshrink.factorize`.
"""

from __future__ import annotations

from ..swap import SwappedHfQuantizer, SwappedQuantizationConfig, register_swapped
from .format import QUANT_METHOD, install_from_shapes

__all__ = ["FactorizedQuantizationConfig", "LlmshrinkFactorizedHfQuantizer", "register_with_transformers"]


class FactorizedQuantizationConfig(SwappedQuantizationConfig):
    """`quantization_config` of a factorized folder; the ranks are read from the tensors."""

    QUANT_METHOD = QUANT_METHOD


class LlmshrinkFactorizedHfQuantizer(SwappedHfQuantizer):
    """Builds the FactorizedLinear modules of a factorized folder before its weights load."""

    install = staticmethod(install_from_shapes)
    what = "factorized"
    trainable = True  # the factors are ordinary nn.Linear weights


def register_with_transformers() -> None:
    """Make transformers load factorized folders (idempotent)."""
    register_swapped(FactorizedQuantizationConfig, LlmshrinkFactorizedHfQuantizer)
