"""Pruning configs: whole decoder layers (`LayerPruneConfig`) and single weights (`WeightPruneConfig`)."""

from __future__ import annotations

import dataclasses

from ..config import MethodConfig
from ..errors import UsageError

__all__ = ["LayerPruneConfig", "WeightPruneConfig", "CRITERIA", "SCORES", "PATTERNS", "SCHEDULES", "HEAL_METHODS"]

CRITERIA = ("block_influence", "angular", "last")
SCORES = ("magnitude", "wanda")
PATTERNS = ("unstructured", "2:4")
SCHEDULES = ("cubic", "linear")
HEAL_METHODS = ("lora", "full")
HEAL_LR = {"lora": 1e-3, "full": 1e-4}  # the default heal_lr of each heal_method


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
        rounds: reach `sparsity` in this many prune -> heal rounds (gradual pruning, the
            train-prune-fine-tune cycle); each round scores the healed model again and zeroes more.
            1: one-shot pruning (then healed if heal_steps > 0).
        heal_steps: healing steps in all (`llmshrink.heal` with KD from the unpruned input as
            teacher), split evenly over the rounds. 0: no healing (rounds > 1 then only re-scores
            between rounds).
        heal_method: `lora` (an adapter, merged after each round; its update is dense, so the
            pruned weights are zeroed again after the merge) or `full` (sparse fine-tuning: every
            surviving weight trains and the pruned ones get no update, `HealConfig.keep_zeros`, so
            nothing a round learns is thrown away). Either way the output is a dense checkpoint
            with exact zeros.
        schedule: the sparsity after round r of R: `cubic` (Zhu & Gupta 2017: s (1 - (1 - r/R)^3),
            most of it early, while the model has most to spare) or `linear` (s r / R).
        rewind: lottery-ticket rewinding (Frankle & Carbin 2019; Renda et al. 2020): before each
            round's healing the surviving weights go back to their values in the input model, so
            only the mask carries over from round to round.
        heal_lr: the healing's peak learning rate (cosine schedule, 2 steps of warmup); None: 1e-3
            for `lora`, 1e-4 for `full` (`HEAL_LR`).
    """

    METHOD = "weight_prune"
    VERSION = 1

    sparsity: float = 0.5
    score: str = "wanda"
    pattern: str = "unstructured"
    scope: str = "layer"
    rounds: int = 1
    heal_steps: int = 0
    schedule: str = "cubic"
    rewind: bool = False
    heal_method: str = "lora"
    heal_lr: float | None = None

    def needs_calibration(self) -> bool:
        return self.score == "wanda"  # magnitude reads the weights only

    def gradual(self) -> bool:
        """Whether this config runs prune -> heal rounds (more than a one-shot prune)."""
        return self.rounds > 1 or self.heal_steps > 0

    def round_sparsities(self) -> list[float]:
        """The sparsity reached after each round, the last one `sparsity`."""
        r = self.rounds
        if self.schedule == "linear":
            return [self.sparsity * (i + 1) / r for i in range(r)]
        return [self.sparsity * (1 - (1 - (i + 1) / r) ** 3) for i in range(r)]

    def learning_rate(self) -> float:
        """The healing's peak learning rate: `heal_lr`, or the default of `heal_method`."""
        return HEAL_LR[self.heal_method] if self.heal_lr is None else self.heal_lr

    def round_steps(self) -> list[int]:
        """Healing steps after each round: heal_steps split evenly, the remainder to the last rounds."""
        base, extra = divmod(self.heal_steps, self.rounds)
        return [base + (1 if i >= self.rounds - extra else 0) for i in range(self.rounds)]

    def validate(self) -> None:
        if not 0 <= self.sparsity < 1:
            raise UsageError(f"sparsity={self.sparsity} must be in [0, 1): the share of weights zeroed")
        if self.score not in SCORES:
            raise UsageError(f"score='{self.score}' is not known; use one of {', '.join(SCORES)}")
        if self.pattern not in PATTERNS:
            raise UsageError(f"pattern='{self.pattern}' is not known; use one of {', '.join(PATTERNS)}")
        if self.scope not in ("layer", "global"):
            raise UsageError(f"scope='{self.scope}' is not known; use 'layer' or 'global'")
        if isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or self.rounds < 1:
            raise UsageError(f"rounds={self.rounds!r} is not a positive whole number; use 1 (one-shot) or more")
        if isinstance(self.heal_steps, bool) or not isinstance(self.heal_steps, int) or self.heal_steps < 0:
            raise UsageError(f"heal_steps={self.heal_steps!r} is not a whole number >= 0; use 0 (no healing) or more")
        if self.schedule not in SCHEDULES:
            raise UsageError(f"schedule='{self.schedule}' is not known; use one of {', '.join(SCHEDULES)}")
        if self.heal_steps and self.heal_steps < self.rounds:
            raise UsageError(f"heal_steps={self.heal_steps} leaves a round of {self.rounds} without healing; give "
                             f"heal_steps >= rounds (e.g. {self.rounds * 12}) or 0")
        if self.rewind and not self.heal_steps:
            raise UsageError("rewind resets the surviving weights before healing, and heal_steps=0 heals nothing; "
                             "give heal_steps, or drop rewind")
        if self.rounds > 1 and self.pattern == "2:4":
            raise UsageError("2:4 has one sparsity (50%), so it cannot be reached in rounds; use rounds=1")
        if self.heal_method not in HEAL_METHODS:
            raise UsageError(f"heal_method='{self.heal_method}' is not known; use one of {', '.join(HEAL_METHODS)}")
        if self.heal_lr is not None and not self.heal_lr > 0:
            raise UsageError(f"heal_lr={self.heal_lr} does not train; use a positive learning rate such as "
                             f"{HEAL_LR[self.heal_method]:g}, or None for that default")
        if self.pattern == "2:4" and self.scope == "global":
            raise UsageError("2:4 keeps two of every four weights everywhere; it has no global threshold, use scope='layer'")
