"""ShareConfig: each decoder linear's weights clustered into 2^bits shared values (per output row
or per linear), stored as codes into a codebook."""

from __future__ import annotations

import dataclasses

from ..config import MethodConfig
from ..errors import UsageError

__all__ = ["PER", "ShareConfig"]

PER = ("row", "tensor")


@dataclasses.dataclass
class ShareConfig(MethodConfig):
    """Weight sharing (Deep Compression's k-means codebooks, weighted as SqueezeLLM weighs them).

    Args:
        bits: each code's width; a codebook holds 2^bits values (2 to 8).
        per: row (one codebook per output row of each linear) or tensor (one per linear).
        weighted: weigh each weight w_ij in the k-means by its input channel's calibration second
            moment H_jj = sum_t x_tj^2 (the diagonal of GPTQ's Hessian, a proxy of the output error
            the weight causes); off: plain k-means on the weights alone (no calibration).
        iters: k-means (Lloyd) iterations at most; a codebook whose codes stop changing stops early.
    """

    METHOD = "share"
    VERSION = 1

    bits: int = 3
    per: str = "row"
    weighted: bool = True
    iters: int = 25

    def validate(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise UsageError(f"bits={self.bits!r} is outside 2-8; a codebook holds 2^bits shared values, use e.g. 3")
        if self.per not in PER:
            raise UsageError(f"per='{self.per}' is not known; use row (a codebook per output row) or tensor "
                             "(one per linear)")
        if isinstance(self.iters, bool) or not isinstance(self.iters, int) or self.iters < 1:
            raise UsageError(f"iters={self.iters!r} runs no k-means iteration; use 1 or more, e.g. 25")

    def needs_calibration(self) -> bool:
        return self.weighted  # plain k-means reads the weights only
