"""Pruning configs: whole decoder layers (`LayerPruneConfig`) and single weights (`WeightPruneConfig`)."""

from __future__ import annotations

import dataclasses

from ..config import MethodConfig
from ..errors import UsageError

__all__ = ["LayerPruneConfig", "WeightPruneConfig", "CRITERIA", "SCORES", "PATTERNS"]

CRITERIA = ("block_influence", "angular", "last")
SCORES = ("magnitude", "wanda")
PATTERNS = ("unstructured", "2:4")


@dataclasses.dataclass
class LayerPruneConfig(MethodConfig):
    """Remove `layers` decoder layers.

    Args:
        layers: how many decoder layers to remove.
        criterion: `block_influence` (ShortGPT: the layers whose output is most like their input,
            1 - mean cosine similarity, lowest first; any positions), `angular` (Gromov et al.
            2024: the run of `layers` consecutive layers with the smallest angular distance between
            the run's input and output, never a run that ends at the final layer), or `last` (the
            final layers: the naive baseline).
        candidates: the criterion's best `candidates` removals are each measured (calibration
            perplexity of the model without them, on up to 8 calibration windows) and the best
            measured one is taken; 1 takes the criterion's choice, still measured and reported.
            A proxy is a guess: a layer whose output looks like its input can still matter.
    """

    METHOD = "layer_prune"
    VERSION = 1

    layers: int = 1
    criterion: str = "block_influence"
    candidates: int = 4

    def needs_calibration(self) -> bool:
        return self.criterion != "last"  # `last` needs no activations

    def validate(self) -> None:
        if self.criterion not in CRITERIA:
            raise UsageError(f"criterion='{self.criterion}' is not known; use one of {', '.join(CRITERIA)}")
        if self.layers < 1:
            raise UsageError(f"layers={self.layers} removes nothing; use a positive number of layers")
        if not isinstance(self.candidates, int) or self.candidates < 1:
            raise UsageError(f"candidates={self.candidates} measures nothing; use 1 (the criterion's choice) or more")


@dataclasses.dataclass
class WeightPruneConfig(MethodConfig):
    """Zero single weights of the decoder's linears, kept as dense tensors with zeros.

    Args:
        sparsity: share of weights zeroed, in [0, 1) (2:4 is always 0.5).
        score: `magnitude` (|W|) or `wanda` (|W| times the L2 norm of the weight's input
            channel over calibration tokens, Sun et al. 2023).
        pattern: `unstructured`, or `2:4` (two of every four consecutive inputs kept).
        scope: `layer` (each output row of each linear pruned to the sparsity, Wanda's grouping)
            or `global` (one threshold over all pruned linears).
    """

    METHOD = "weight_prune"
    VERSION = 1

    sparsity: float = 0.5
    score: str = "wanda"
    pattern: str = "unstructured"
    scope: str = "layer"

    def needs_calibration(self) -> bool:
        return self.score == "wanda"  # magnitude reads the weights only

    def validate(self) -> None:
        if not 0 <= self.sparsity < 1:
            raise UsageError(f"sparsity={self.sparsity} must be in [0, 1): the share of weights zeroed")
        if self.score not in SCORES:
            raise UsageError(f"score='{self.score}' is not known; use one of {', '.join(SCORES)}")
        if self.pattern not in PATTERNS:
            raise UsageError(f"pattern='{self.pattern}' is not known; use one of {', '.join(PATTERNS)}")
        if self.scope not in ("layer", "global"):
            raise UsageError(f"scope='{self.scope}' is not known; use 'layer' or 'global'")
        if self.pattern == "2:4" and self.scope == "global":
            raise UsageError("2:4 keeps two of every four weights everywhere; it has no global threshold, use scope='layer'")
