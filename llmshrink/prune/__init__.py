"""Layer and weight pruning."""

from .apply import prune, save_pruned
from .config import LayerPruneConfig, WeightPruneConfig

__all__ = ["LayerPruneConfig", "WeightPruneConfig", "prune", "save_pruned"]
