"""`PackConfig`: the settings of lossless packing (the `pack` pipeline step; `llmshrink pack`)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import MethodConfig
from ..errors import UsageError
from .codec import DEFAULT_LEVEL

__all__ = ["PackConfig"]


@dataclass
class PackConfig(MethodConfig):
    """Lossless packing of a checkpoint folder (the `pack` pipeline step; `llmshrink pack`).

    Args:
        level: zstd level of the match-finding candidate per chunk (1-22; 0 = Huffman literals only).
        threads: coding threads (None: os.cpu_count()).
    """

    METHOD = "pack"

    level: int = DEFAULT_LEVEL
    threads: int | None = None

    def validate(self) -> None:
        if not isinstance(self.level, int) or not 0 <= self.level <= 22:
            raise UsageError(f"level={self.level} is outside 0-22; use 0 (Huffman only) to 22, e.g. {DEFAULT_LEVEL}")
        if self.threads is not None and self.threads < 1:
            raise UsageError(f"threads={self.threads} is not a thread count; use 1 or more, or leave it out")
