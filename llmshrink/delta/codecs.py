"""The delta codecs as objects in one table, keyed by the name a DeltaConfig and the checkpoint use.

Each codec turns `delta = finetuned - base` ([out, in] fp32) into a few named tensors (`encode`,
keyed by the suffix they get in the checkpoint, `<weight name>.<suffix>`) and back (`decode`, the
dense delta), adds them onto a base weight (`apply`, what loading does), and serves from the
compact form (`matmul`: `x @ delta.T`, `rows`: an embedding lookup) without materialising the
fine-tuned weights. The math itself is in `algorithm.py`; compress.py, load.py and serve.py walk
the models and folders and look the codec up here.

`CODECS` holds the codecs a DeltaConfig can name (bitdelta, lowrank, dare, mixed); `KINDS` adds the
two ways a tensor is stored as it is (`exact`: F - B, `full`: F). `bits`, the mixed bands' bit
widths (top first, from the delta's config), is read by mixed only.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from ..errors import UsageError
from ..kernels.onebit import sign_matmul
from .algorithm import bitdelta, dare, lowrank, mixed, mixed_factors, signs, unpack_bits

__all__ = ["DeltaCodec", "BitDelta", "LowRank", "Dare", "Mixed", "Exact", "Full", "CODECS", "KINDS", "codec_of"]

Parts = dict[str, torch.Tensor]


class DeltaCodec:
    """One kind of stored delta. Subclasses define `decode` (and `encode` for the codecs a config
    names); `apply`, `matmul` and `rows` go through the dense delta unless a cheaper way exists."""

    name: ClassVar[str]
    distils: ClassVar[bool] = False  # whether `distill_steps` trains this codec's scales

    def validate(self, config) -> None:
        """Refuse a DeltaConfig whose fields this codec reads but cannot use."""

    def check_shapes(self, config, shapes: dict[str, tuple[int, ...]]) -> None:
        """Refuse, before any work, weights (name -> shape, those to be encoded) this config cannot code."""

    def encode(self, delta: torch.Tensor, config, generator: torch.Generator) -> Parts:
        """[out, in] fp32 delta -> {suffix: tensor}, reading this codec's fields of the DeltaConfig."""
        raise NotImplementedError(f"'{self.name}' tensors are stored as they are, not encoded")

    def decode(self, parts: Parts, shape: tuple[int, ...], bits: tuple[int, ...] = ()) -> torch.Tensor:
        """The dense [out, in] fp32 delta."""
        raise NotImplementedError

    def apply(self, weight: torch.Tensor, parts: Parts, shape: tuple[int, ...],
              bits: tuple[int, ...] = ()) -> torch.Tensor:
        """`weight + delta` (fp32 arithmetic), in the weight's dtype, on its device."""
        delta = self.decode(parts, shape, bits).to(weight.device)
        return (weight.float() + delta.reshape(weight.shape)).to(weight.dtype)

    def matmul(self, x: torch.Tensor, parts: Parts, shape: tuple[int, ...], bits: tuple[int, ...] = ()) -> torch.Tensor:
        """`x @ delta.T`: [..., in] -> [..., out]."""
        return x @ self.decode(parts, shape, bits).to(x.dtype).t()

    def rows(self, ids: torch.Tensor, parts: Parts, shape: tuple[int, ...], bits: tuple[int, ...] = ()) -> torch.Tensor:
        """Rows `ids` (any shape) of the dense delta: [*ids.shape, in] fp32."""
        return self.lookup(ids.reshape(-1), parts, shape, bits).reshape(*ids.shape, shape[1])

    def lookup(self, flat: torch.Tensor, parts: Parts, shape: tuple[int, ...], bits: tuple[int, ...] = ()) -> torch.Tensor:
        """Rows `flat` ([n] long) of the dense delta, [n, in]; decoding only those where the codec allows it."""
        return self.decode(parts, shape, bits)[flat]

    def serving_form(self, parts: Parts, shape: tuple[int, ...], bits: tuple[int, ...],
                     original: torch.Tensor) -> tuple[DeltaCodec, Parts]:
        """(codec, parts) a served model runs from, given the base's `original` tensor: what is stored."""
        return self, parts


class BitDelta(DeltaCodec):
    """sign(delta) as 1-bit planes and one scale per matrix or row (BitDelta)."""

    name = "bitdelta"
    distils = True

    def encode(self, delta, config, generator):
        return bitdelta(delta, config.scale_granularity)

    def decode(self, parts, shape, bits=()):
        return signs(parts["sign"], shape[1]) * parts["scale"].float()

    def matmul(self, x, parts, shape, bits=()):
        return sign_matmul(x, parts["sign"], parts["scale"], shape[1])

    def lookup(self, flat, parts, shape, bits=()):
        scale = parts["scale"]
        return signs(parts["sign"][flat], shape[1]) * (scale[flat] if scale.numel() > 1 else scale)


class LowRank(DeltaCodec):
    """Truncated SVD, delta ~ u @ v: `rank` directions, or the fewest holding `energy`."""

    name = "lowrank"

    def validate(self, config):
        if (config.rank is None) == (config.energy is None):
            raise UsageError("lowrank needs exactly one of rank (e.g. 16) or energy (e.g. 0.9)")
        if config.rank is not None and config.rank < 1:
            raise UsageError(f"rank={config.rank} must be >= 1")
        if config.energy is not None and not 0 < config.energy <= 1:
            raise UsageError(f"energy={config.energy} must be in (0, 1]")

    def check_shapes(self, config, shapes):
        if config.rank is None:
            return
        small = [name for name, shape in shapes.items() if min(shape) < config.rank]
        if small:
            raise UsageError(f"rank={config.rank} is larger than {small[0]} {list(shapes[small[0]])} allows; "
                             f"use rank <= {min(shapes[small[0]])} or an energy threshold")

    def encode(self, delta, config, generator):
        return lowrank(delta, config.rank, config.energy)

    def decode(self, parts, shape, bits=()):
        return parts["u"].float() @ parts["v"].float()

    def matmul(self, x, parts, shape, bits=()):
        return (x @ parts["v"].to(x.dtype).t()) @ parts["u"].to(x.dtype).t()

    def lookup(self, flat, parts, shape, bits=()):
        return parts["u"][flat].float() @ parts["v"].float()


class Dare(DeltaCodec):
    """Drop a share `p` of the entries at random, rescale the rest, store them sparse (DARE)."""

    name = "dare"

    def encode(self, delta, config, generator):
        return dare(delta, config.p, generator)

    def decode(self, parts, shape, bits=()):
        dense = torch.zeros(shape, dtype=torch.float32, device=parts["values"].device)
        dense[unpack_bits(parts["mask"], shape[1])] = parts["values"].float()
        return dense


class Mixed(DeltaCodec):
    """SVD bands with more bits for the top singular directions (Delta-CoMe)."""

    name = "mixed"

    def encode(self, delta, config, generator):
        return mixed(delta, config.mixed_ranks, config.mixed_bits)

    def decode(self, parts, shape, bits=()):
        u, v = mixed_factors(parts, shape, bits)
        return u @ v

    def matmul(self, x, parts, shape, bits=()):
        u, v = mixed_factors(parts, shape, bits)
        return (x @ v.to(x.dtype).t()) @ u.to(x.dtype).t()

    def serving_form(self, parts, shape, bits, original):
        u, v = mixed_factors(parts, shape, bits)  # dequantized once: serving runs two thin matmuls
        return LOWRANK, {"u": u, "v": v}


class Exact(DeltaCodec):
    """The delta F - B itself, `<name>.exact` (small tensors, and those the config names)."""

    name = "exact"

    def decode(self, parts, shape, bits=()):
        return parts["exact"].float()

    def matmul(self, x, parts, shape, bits=()):
        return x @ parts["exact"].to(x.dtype).t()

    def lookup(self, flat, parts, shape, bits=()):
        return parts["exact"][flat].float()


class Full(DeltaCodec):
    """The fine-tuned tensor F itself, `<name>.full`: applying it replaces the base's values."""

    name = "full"

    def decode(self, parts, shape, bits=()):
        raise NotImplementedError("a 'full' tensor is the fine-tuned value, not a delta; apply it onto the base")

    def apply(self, weight, parts, shape, bits=()):
        return parts["full"].to(weight.device, weight.dtype)

    def serving_form(self, parts, shape, bits, original):
        return EXACT, {"exact": parts["full"].to(original.device).float() - original.float()}


LOWRANK, EXACT = LowRank(), Exact()
CODECS: dict[str, DeltaCodec] = {c.name: c for c in (BitDelta(), LOWRANK, Dare(), Mixed())}
KINDS: dict[str, DeltaCodec] = {**CODECS, EXACT.name: EXACT, "full": Full()}


def codec_of(kind: str) -> DeltaCodec:
    """The codec of a stored tensor's `kind` (as a delta folder's description lists it)."""
    if kind not in KINDS:
        raise UsageError(f"delta tensors of kind '{kind}' are not known to this llmshrink (it reads "
                         f"{', '.join(KINDS)}); upgrade llmshrink or re-create the delta")
    return KINDS[kind]
