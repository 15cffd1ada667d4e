"""Learning-rate schedules: linear warmup, then cosine or linear decay."""

from __future__ import annotations

import math

__all__ = ["SCHEDULES", "lr_factor"]

SCHEDULES = ("cosine", "linear")


def lr_factor(step: int, steps: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based) of `steps`.

    Linear warmup over `warmup` steps (the first step already trains at lr / warmup), then
    cosine or linear decay that would reach 0 one step after the last.

    Args:
        step: the optimizer step about to run, 0-based.
        steps: all optimizer steps of the run.
        warmup: steps of linear warmup, 0 <= warmup <= steps.
        schedule: one of SCHEDULES.
    Returns:
        A factor in (0, 1].
    """
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup + 1) / (steps - warmup + 1)  # in (0, 1): the last step still trains
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress
