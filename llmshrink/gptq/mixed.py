"""Mixed precision under a size budget: per-linear bit widths that least raise the predicted loss.

Pure functions. `stored_bits` is what one linear costs on disk in the GPTQ layout (codes, packed
zeros, fp16 scales, int32 g_idx), so the budget counts everything a reader loads. `allocate`
solves the multiple-choice knapsack "one width per linear, total size within the budget, least
summed loss" by dynamic programming over the budget in small units. `plan_rules` writes a plan as GPTQ `dynamic` overrides.
"""

from __future__ import annotations

import math
import re
from collections import Counter

import torch

from ..errors import UsageError

__all__ = ["CANDIDATE_BITS", "allocate", "average_bits", "check_budget", "plan_rules", "stored_bits"]

CANDIDATE_BITS = (2, 3, 4, 8)


def stored_bits(bits: int, group_size: int, in_features: int, out_features: int) -> int:
    """Bits one GPTQ linear takes on disk: qweight, qzeros (packed at `bits`), fp16 scales, g_idx."""
    groups = 1 if group_size == -1 else math.ceil(in_features / group_size)
    return in_features * out_features * bits + groups * out_features * (bits + 16) + in_features * 32


def average_bits(plan: dict[str, int], options: dict[str, dict[int, tuple[int, float]]],
                 weights: dict[str, int]) -> float:
    """Stored bits per weight of `plan` over the linears it covers."""
    return sum(options[name][bits][0] for name, bits in plan.items()) / sum(weights[name] for name in plan)


def allocate(options: dict[str, dict[int, tuple[int, float]]], budget: float, resolution: int = 4096) -> dict[str, int]:
    """Bits per linear, least summed loss with total stored bits <= `budget`.

    A dynamic program over the budget cut into `resolution` units (each size rounded up, so the
    plan always fits), exact up to that rounding; the rounding's slack is then spent on the
    upgrades with the best loss saved per bit.

    Args:
        options: per linear, per candidate bits: (stored bits, predicted loss).
        budget: total stored bits allowed.
    Raises:
        ValueError when even the smallest widths exceed the budget (`check_budget` says it first).
    """
    smallest = sum(min(size for size, _ in opts.values()) for opts in options.values())
    if smallest > budget:
        raise ValueError(f"budget {budget} is below the smallest plan ({smallest} bits)")
    unit = budget / resolution
    units_of = lambda size: math.ceil(size / unit - 1e-9)  # noqa: E731
    best = torch.full((resolution + 1,), math.inf, dtype=torch.float64)
    best[0] = 0.0  # best[c]: least loss of the linears so far in exactly c units
    choices = []
    for opts in options.values():
        widths = sorted(opts)
        candidates = torch.full((len(widths), resolution + 1), math.inf, dtype=torch.float64)
        for k, b in enumerate(widths):
            units = units_of(opts[b][0])
            if units <= resolution:
                candidates[k, units:] = best[: resolution + 1 - units] + opts[b][1]
        best, pick = candidates.min(0)
        choices.append((widths, pick))
    if not math.isfinite(float(best.min())):  # rounding up left no room: the smallest widths, then the fill
        plan = {name: min(opts, key=lambda b: opts[b][0]) for name, opts in options.items()}
    else:
        c, plan = int(best.argmin()), {}
        for name, (widths, pick) in zip(reversed(list(options)), reversed(choices)):
            plan[name] = widths[int(pick[c])]
            c -= units_of(options[name][plan[name]][0])
        plan = {name: plan[name] for name in options}
    return _fill(plan, options, budget - sum(options[n][b][0] for n, b in plan.items()))


def _fill(plan: dict[str, int], options, left: float) -> dict[str, int]:
    """Spend `left` bits on single-step upgrades, best loss saved per bit first."""
    plan = dict(plan)
    while True:
        best, best_gain = None, 0.0
        for name, bits in plan.items():
            size, loss = options[name][bits]
            for b, (s, l) in options[name].items():
                if s > size and s - size <= left and loss > l:
                    gain = (loss - l) / (s - size)
                    if gain > best_gain:
                        best, best_gain = (name, b), gain
        if best is None:
            return plan
        name, b = best
        left -= options[name][b][0] - options[name][plan[name]][0]
        plan[name] = b


def plan_rules(plan: dict[str, int]) -> tuple[int, dict[str, dict[str, int]]]:
    """(the most common bits, `dynamic` rules giving every other linear its bits by exact name)."""
    base = Counter(plan.values()).most_common(1)[0][0]
    return base, {f"+:{re.escape(name)}": {"bits": bits} for name, bits in plan.items() if bits != base}


def check_budget(target_bits: float, smallest: float, group_size: int) -> None:
    """A one-line error when `target_bits` is below what the smallest widths take."""
    if target_bits < smallest:
        raise UsageError(f"target_bits={target_bits} is below {smallest:.2f}, the fewest bits per weight this "
                         f"model's linears take at group size {group_size} (scales and zeros included); raise "
                         "it or use a larger group size")
