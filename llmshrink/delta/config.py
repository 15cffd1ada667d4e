"""`DeltaConfig`: how a fine-tune is stored as a compressed difference from its base."""

from __future__ import annotations

import dataclasses
import fnmatch

from ..config import MethodConfig
from ..errors import UsageError
from .codecs import CODECS

__all__ = ["DeltaConfig"]

_DTYPES = ("float16", "bfloat16", "float32")


@dataclasses.dataclass
class DeltaConfig(MethodConfig):
    """One config for the four delta codecs; each reads only its own fields.

    Args:
        codec: a name in `codecs.CODECS`: `bitdelta` (sign bits + one scale per matrix, BitDelta),
            `lowrank` (truncated SVD), `dare` (drop a fraction p at random, rescale the rest, store
            sparse) or `mixed` (SVD with more bits for the top singular directions, Delta-CoMe).
        scale_granularity: bitdelta scales per `tensor` (BitDelta) or per output `row`.
        distill_steps: bitdelta scale distillation steps (0: keep mean |delta|); only the scales
            train, to match the fine-tuned model's logits on calibration text.
        distill_lr: Adam learning rate of the log-scale multipliers.
        rank: lowrank rank, or None to use `energy`.
        energy: lowrank keeps the fewest directions holding this share of the squared norm.
        p: dare drop probability, in [0, 1).
        mixed_ranks, mixed_bits: mixed bands, top first: band k keeps the next mixed_ranks[k]
            singular directions with mixed_bits[k]-bit codes (one scale per direction).
        min_numel: tensors with fewer elements, and every tensor that is not 2-D (norms,
            biases), are stored exactly.
        exact: glob patterns of tensor names stored exactly (e.g. "*embed_tokens*").
        exact_dtype: dtype of exactly-stored tensors.
        exact_format: store those as the `delta` (F - B) or the `full` fine-tuned tensor.
        seed: dare's random mask and distillation's calibration windows.
    """

    METHOD = "delta"
    VERSION = 1

    codec: str = "bitdelta"
    scale_granularity: str = "tensor"
    distill_steps: int = 0
    distill_lr: float = 1e-2
    rank: int | None = None
    energy: float | None = None
    p: float = 0.9
    mixed_ranks: tuple[int, ...] = (2, 32, 64)
    mixed_bits: tuple[int, ...] = (8, 3, 2)
    min_numel: int = 100_000
    exact: tuple[str, ...] = ()
    exact_dtype: str = "float32"
    exact_format: str = "delta"
    seed: int = 0

    def validate(self) -> None:
        self.mixed_ranks, self.mixed_bits, self.exact = tuple(self.mixed_ranks), tuple(self.mixed_bits), tuple(self.exact)
        if self.codec not in CODECS:
            raise UsageError(f"codec='{self.codec}' is not known; use one of {', '.join(CODECS)}")
        if self.scale_granularity not in ("tensor", "row"):
            raise UsageError(f"scale_granularity='{self.scale_granularity}' is invalid; use 'tensor' or 'row'")
        if self.distill_steps < 0:
            raise UsageError(f"distill_steps={self.distill_steps} must be >= 0")
        CODECS[self.codec].validate(self)
        if not 0 <= self.p < 1:
            raise UsageError(f"p={self.p} must be in [0, 1): the share of delta entries dropped")
        if len(self.mixed_ranks) != len(self.mixed_bits) or not self.mixed_ranks:
            raise UsageError("mixed_ranks and mixed_bits need the same, non-zero length (one bit width per band)")
        if any(r < 1 for r in self.mixed_ranks) or any(b not in (2, 3, 4, 8) for b in self.mixed_bits):
            raise UsageError(f"mixed bands {self.mixed_ranks} x {self.mixed_bits} bits are invalid; "
                             "ranks >= 1, bits one of 2, 3, 4, 8")
        if self.exact_dtype not in _DTYPES:
            raise UsageError(f"exact_dtype='{self.exact_dtype}' is invalid; use one of {', '.join(_DTYPES)}")
        if self.exact_format not in ("delta", "full"):
            raise UsageError(f"exact_format='{self.exact_format}' is invalid; use 'delta' or 'full'")

    def stores_exactly(self, name: str, shape: tuple[int, ...]) -> bool:
        """Whether tensor `name` is kept exactly rather than compressed."""
        numel = 1
        for s in shape:
            numel *= s
        return len(shape) != 2 or numel < self.min_numel or any(fnmatch.fnmatchcase(name, p) for p in self.exact)
