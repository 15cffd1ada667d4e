"""Plain `transformers.AutoModelForCausalLM.from_pretrained` for shared folders, through llmshrink.

A shared folder's config.json says `quantization_config: {quant_method: llmshrink_shared}`.
`register_with_transformers()` registers that method in transformers' quantizer registry
(llmshrink.swap): before the weights load, the quantizer swaps an empty SharedLinear in for every
linear whose `<name>.codebook` the checkpoint holds, and transformers loads codes and codebooks
by name. Without it transformers skips the unknown quant_method with a warning and gives the
shared linears random weights: load such a folder through llmshrink, or after `import llmshrink`.
"""

from __future__ import annotations

from ..swap import SwappedHfQuantizer, SwappedQuantizationConfig, register_swapped
from .format import QUANT_METHOD
from .modules import install_from_shapes

__all__ = ["LlmshrinkSharedHfQuantizer", "SharedQuantizationConfig", "register_with_transformers"]


class SharedQuantizationConfig(SwappedQuantizationConfig):
    """`quantization_config` of a shared folder; bits and codebooks are read from the tensors."""

    QUANT_METHOD = QUANT_METHOD


class LlmshrinkSharedHfQuantizer(SwappedHfQuantizer):
    """Builds the SharedLinear modules of a shared folder before its weights load."""

    install = staticmethod(install_from_shapes)
    what = "shared"
    trainable = False  # codes and codebooks are buffers, not parameters


def register_with_transformers() -> None:
    """Make transformers load shared folders (idempotent)."""
    register_swapped(SharedQuantizationConfig, LlmshrinkSharedHfQuantizer)
