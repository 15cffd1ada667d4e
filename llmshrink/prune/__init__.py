"""Layer and weight pruning."""

from .apply import prune, save_pruned
from .config import LayerPruneConfig, WeightPruneConfig
from .gradual import gradual_prune

__all__ = ["LayerPruneConfig", "WeightPruneConfig", "gradual_prune", "prune", "save_pruned"]
