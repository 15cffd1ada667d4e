"""Pruning math, tensor in / tensor out: layer redundancy scores, layer choice, weight masks."""

from __future__ import annotations

import itertools
import math

import torch

from ..errors import UsageError

__all__ = ["cosine_sums", "block_influence", "angular_distance", "choose_layers", "removal_candidates", "prune_mask",
           "two_four_mask"]


def cosine_sums(states: list[torch.Tensor]) -> torch.Tensor:
    """Summed cosine similarity between every pair of hidden states over the tokens of a batch.

    Args:
        states: L + 1 tensors [tokens, hidden]: the input of layer 0, then each layer's output.
    Returns:
        [L + 1, L + 1] sums over tokens of cos(states[i], states[j]) (fp64).
    """
    unit = torch.stack([torch.nn.functional.normalize(s.double(), dim=-1) for s in states])  # [L+1, T, H]
    return torch.einsum("ith,jth->ij", unit, unit)


def block_influence(cos_mean: torch.Tensor) -> torch.Tensor:
    """ShortGPT's block influence of each layer: 1 - mean cos(input, output). [L+1, L+1] -> [L]."""
    n = cos_mean.shape[0] - 1
    return 1 - torch.stack([cos_mean[i, i + 1] for i in range(n)])


def angular_distance(cos_mean: torch.Tensor, run: int) -> torch.Tensor:
    """Angular distance arccos(cos) / pi between the input of layer l and that of layer l + run,
    for every start l (Gromov et al. 2024). [L+1, L+1] -> [L - run + 1].

    Uses the mean cosine over tokens (the paper averages the angle; both rank alike in practice
    and this one needs only the summed cosines)."""
    n = cos_mean.shape[0] - 1
    return torch.stack([torch.arccos(cos_mean[i, i + run].clamp(-1, 1)) / math.pi for i in range(n - run + 1)])


def removal_candidates(criterion: str, cos_mean: torch.Tensor, count: int, k: int = 1) -> list[tuple[list[int], float]]:
    """The proxy's `k` best removals of `count` layers, best first, as (sorted layers, proxy score);
    lower scores are more removable.

    block_influence: the `count`-subsets of the `count + k - 1` lowest-scoring layers, by summed
    score (the best is the `count` lowest). angular: the runs of `count` consecutive layers with
    the smallest angular distance, never a run that ends at the final layer (its paper keeps the
    last layer: the head reads its output directly). last: the final layers, the only candidate.
    """
    n = cos_mean.shape[0] - 1
    if count >= n:
        raise UsageError(f"removing {count} of {n} decoder layers leaves none; remove at most {n - 1}")
    if criterion == "block_influence":
        scores = block_influence(cos_mean).tolist()
        pool = sorted(range(n), key=lambda i: scores[i])[:count + k - 1]
        subsets = sorted(itertools.combinations(sorted(pool), count), key=lambda c: (sum(scores[i] for i in c), c))
        return [(list(c), sum(scores[i] for i in c)) for c in subsets[:k]]
    if criterion == "angular":
        scores = angular_distance(cos_mean, count)[: n - count].tolist()  # starts whose run ends before layer n - 1
        starts = sorted(range(len(scores)), key=lambda s: (scores[s], s))[:k]
        return [(list(range(s, s + count)), scores[s]) for s in starts]
    return [(list(range(n - count, n)), float("nan"))]


def choose_layers(criterion: str, cos_mean: torch.Tensor, count: int) -> tuple[list[int], torch.Tensor]:
    """The proxy's best removal and the scores behind it (lower = more removable): block_influence
    scores per layer, angular scores per start of a run of `count` layers, `last` block influence."""
    drop = removal_candidates(criterion, cos_mean, count)[0][0]
    scores = angular_distance(cos_mean, count) if criterion == "angular" else block_influence(cos_mean)
    return drop, scores


def two_four_mask(scores: torch.Tensor) -> torch.Tensor:
    """Keep the two highest of every four consecutive scores along the input dim. [out, in] -> bool."""
    out, n = scores.shape
    if n % 4:
        raise UsageError(f"2:4 sparsity needs widths divisible by 4; this linear has {n} inputs")
    groups = scores.reshape(out, n // 4, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(2, groups.topk(2, dim=2).indices, True)
    return keep.reshape(out, n)


def prune_mask(scores: torch.Tensor, sparsity: float, pattern: str, threshold: float | None = None) -> torch.Tensor:
    """Which weights to keep ([out, in] bool) from their scores (higher = keep).

    unstructured: per output row, the lowest `sparsity` share is dropped, or everything at or
    below `threshold` when one is given (global scope); 2:4: see `two_four_mask`."""
    if pattern == "2:4":
        return two_four_mask(scores)
    if threshold is not None:
        return scores > threshold
    drop = int(scores.shape[1] * sparsity)
    keep = torch.ones_like(scores, dtype=torch.bool)
    if drop:
        keep.scatter_(1, scores.argsort(dim=1)[:, :drop], False)
    return keep
