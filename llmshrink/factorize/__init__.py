"""Low-rank factorization of the decoder linears (SVD-LLM's truncation-aware whitening, ranks
allocated across the model). whiten.py and allocate.py are the math, apply.py walks the model,
modules.py holds FactorizedLinear, format.py the folder, hf.py its transformers loader."""

from .allocate import allocate_ranks, uniform_ranks
from .apply import factorize
from .config import FactorizeConfig
from .format import load_factorized, save_factorized
from .hf import register_with_transformers
from .modules import FactorizedLinear
from .whiten import factorize_weight, truncation_errors, whitened_spectrum, whitened_svd, whitening

__all__ = ["FactorizeConfig", "FactorizedLinear", "allocate_ranks", "factorize", "factorize_weight", "load_factorized",
           "register_with_transformers", "save_factorized", "truncation_errors", "uniform_ranks", "whitened_spectrum",
           "whitened_svd", "whitening"]

register_with_transformers()  # plain transformers loads factorized folders once this package is imported
