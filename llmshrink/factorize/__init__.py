"""Low-rank factorization of the decoder linears (SVD-LLM's truncation-aware whitening, ranks
allocated across the model). whiten.py and allocate.py are the math, apply.py walks the model,
scores.py is the score map any size is cut from, modules.py holds FactorizedLinear, format.py the
folder, hf.py its transformers loader."""

from .allocate import allocate_ranks, uniform_ranks
from .apply import factorize, save_score_map
from .config import FactorizeConfig
from .format import load_factorized, save_factorized
from .hf import register_with_transformers
from .modules import FactorizedLinear
from .scores import ScoreMap, read_scores
from .whiten import (direction_importance, error_curve, factorize_weight, truncation_errors, whitened_spectrum,
                     whitened_svd, whitening)

__all__ = ["FactorizeConfig", "FactorizedLinear", "ScoreMap", "allocate_ranks", "direction_importance", "error_curve",
           "factorize", "factorize_weight", "load_factorized", "read_scores", "register_with_transformers",
           "save_factorized", "save_score_map", "truncation_errors", "uniform_ranks", "whitened_spectrum",
           "whitened_svd", "whitening"]

register_with_transformers()  # plain transformers loads factorized folders once this package is imported
