"""RotateConfig: the residual stream (and optionally the attention value/output space) rotated by
orthogonal matrices folded into the weights."""

from __future__ import annotations

import dataclasses

from ..config import MethodConfig
from ..errors import UsageError

__all__ = ["KINDS", "RotateConfig"]

KINDS = ("hadamard", "random")


@dataclasses.dataclass
class RotateConfig(MethodConfig):
    """Rotate a model offline so its weights and activations have fewer outliers to round.

    Args:
        kind: hadamard (a randomized Hadamard matrix where the width has a known order, else a
            random orthogonal one) or random (a seeded Haar-random orthogonal matrix).
        heads: also rotate each attention head's value/output space (one head-width matrix).
        seed: the sign flips and random matrices.
    """

    METHOD = "rotate"
    VERSION = 1

    kind: str = "hadamard"
    heads: bool = True
    seed: int = 0

    def validate(self) -> None:
        if self.kind not in KINDS:
            raise UsageError(f"kind='{self.kind}' is not known; use one of {', '.join(KINDS)}")
