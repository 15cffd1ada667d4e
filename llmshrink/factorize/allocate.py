"""Ranks across linears for one parameter budget, from each linear's error-vs-rank curve.

A linear [out, in] costs out * in dense and r * (out + in) at rank r; it is factorized only at
ranks that save parameters (r * (out + in) < out * in). `allocate_ranks` minimizes the summed
output error under the budget greedily: each linear offers its next step (one more rank, or the
jump from its rank to dense), and the step with the most error removed per parameter is taken
while it fits. The curves are convex in the rank (squared singular values, descending), so this
is the Lagrangian optimum up to the last steps that do not fit.
"""

from __future__ import annotations

import heapq

import torch

from ..errors import UsageError

__all__ = ["allocation_cost", "allocate_ranks", "check_budget", "dense_cost", "max_saving_rank", "uniform_ranks"]


def dense_cost(shape: tuple[int, int]) -> int:
    return shape[0] * shape[1]


def max_saving_rank(shape: tuple[int, int]) -> int:
    """The largest rank whose two factors hold fewer parameters than the dense weight (0: none)."""
    out, inp = shape
    return min(out, inp, (out * inp - 1) // (out + inp))


def allocation_cost(ranks: dict[str, int | None], shapes: dict[str, tuple[int, int]]) -> int:
    """Parameters of the linears at `ranks` (None: dense)."""
    return sum(dense_cost(shapes[n]) if r is None else r * sum(shapes[n]) for n, r in ranks.items())


def uniform_ranks(shapes: dict[str, tuple[int, int]], ratio: float, min_rank: int = 1) -> dict[str, int | None]:
    """Every linear keeps `ratio` of its own parameters: the largest rank within that share (at
    least `min_rank`), dense where that rank saves nothing or `ratio` is 1."""
    ranks = {}
    for name, shape in shapes.items():
        r = max(min_rank, int(ratio * dense_cost(shape) // sum(shape)))
        ranks[name] = None if ratio >= 1 or r > max_saving_rank(shape) else r
    return ranks


def check_budget(shapes: dict[str, tuple[int, int]], ratio: float, min_rank: int = 1) -> dict[str, int | None]:
    """The smallest allocation (rank `min_rank` wherever that saves parameters, else dense), or a
    UsageError if even that exceeds `ratio` (checked from the shapes alone, before any work)."""
    ranks = {n: min_rank if max_saving_rank(s) >= min_rank else None for n, s in shapes.items()}
    total = sum(dense_cost(s) for s in shapes.values())
    spent = allocation_cost(ranks, shapes)
    if spent > int(ratio * total):
        raise UsageError(f"ratio={ratio} is below what rank {min_rank} everywhere holds ({spent / total:.4f} of the "
                         f"linears' parameters); use a ratio of at least {spent / total:.4f}")
    return ranks


def _offer(err: torch.Tensor, shape: tuple[int, int], r: int, jump: bool) -> tuple[float, int, bool] | None:
    """(error removed per parameter, parameters, is the jump to dense) of a linear's next step at rank r."""
    step = sum(shape)
    single = (float(err[r] - err[r + 1]) / step, step, False) if r < max_saving_rank(shape) else None
    cost = dense_cost(shape) - r * step
    dense = (float(err[r]) / cost, cost, True) if jump else None
    if single is None or (dense is not None and dense[0] >= single[0]):
        return dense
    return single


def allocate_ranks(errors: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]], ratio: float,
                   min_rank: int = 1) -> dict[str, int | None]:
    """The rank of every linear (None: dense) minimizing the summed error within `ratio` of the
    linears' dense parameters.

    Args:
        errors: name -> [k + 1] error at each rank 0..k (`truncation_errors`), non-increasing.
        shapes: name -> (out, in).
        ratio: share of the summed dense parameters the result may hold, in (0, 1].
        min_rank: the smallest rank a factorized linear gets.
    Returns:
        name -> rank, or None for a linear kept dense.
    """
    ranks = check_budget(shapes, ratio, min_rank)
    budget = int(ratio * sum(dense_cost(s) for s in shapes.values()))
    spent = allocation_cost(ranks, shapes)
    heap: list = []

    def push(name: str, jump: bool = True) -> None:
        offer = _offer(errors[name], shapes[name], ranks[name], jump)
        if offer is not None:
            heapq.heappush(heap, (-offer[0], name, offer[1], offer[2]))

    for name, r in ranks.items():
        if r is not None:
            push(name)
    while heap:
        _, name, cost, to_dense = heapq.heappop(heap)
        if spent + cost > budget:
            if to_dense:  # the jump does not fit; single ranks may
                push(name, jump=False)
            continue
        spent += cost
        if to_dense:
            ranks[name] = None
        else:
            ranks[name] += 1
            push(name)
    return ranks
