"""llmshrink: make Hugging Face language models smaller and cheaper while keeping them good."""

from .auto import AutoModelForCausalLM, load_model, load_tokenizer
from .delta import DeltaConfig, DeltaModel, compress_delta
from .delta.hf import register_with_transformers as _register_delta_with_transformers
from .errors import UsageError
from .factorize import FactorizeConfig  # also registers factorized folders with transformers
from .gptq.config import GPTQConfig, RTNConfig
from .gptq.hf import register_with_transformers as _register_with_transformers
from .gptq.quantize import quantize
from .heal import HealConfig  # llmshrink.heal stays the package (heal.heal is the function)
from .hub import push_to_hub
from .methods import compress
from .models import DEFAULT_MODEL, resolve_model
from .pack import PackConfig
from .prune import LayerPruneConfig, WeightPruneConfig, prune
from .share import ShareConfig  # also registers shared folders with transformers
from .width_prune import WidthPruneConfig

__version__ = "0.1.0"

# Plain transformers.AutoModelForCausalLM loads GPTQ checkpoints through llmshrink from here on
# (unless transformers' own GPTQ path can run; see llmshrink/gptq/hf.py), and delta folders
# (model_type llmshrink_delta; see llmshrink/delta/hf.py), and factorized and shared folders
# (llmshrink/factorize/hf.py, llmshrink/share/hf.py).
_register_with_transformers()
_register_delta_with_transformers()

__all__ = ["AutoModelForCausalLM", "DEFAULT_MODEL", "DeltaConfig", "DeltaModel", "FactorizeConfig", "GPTQConfig", "HealConfig",
           "LayerPruneConfig", "PackConfig", "RTNConfig", "ShareConfig", "UsageError", "WeightPruneConfig", "WidthPruneConfig", "compress", "compress_delta",
           "load_model", "load_tokenizer", "prune", "push_to_hub", "quantize", "resolve_model", "__version__"]
