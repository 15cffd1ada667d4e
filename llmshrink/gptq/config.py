"""`GPTQConfig`: how to quantize, per model and per module; `ALGORITHMS`: what its `algorithm` names.

Round-to-nearest is one entry of `ALGORITHMS` (`algorithm="rtn"`), and code asks the entry (its
`quantize`, `needs_hessian`, `act_order`) rather than comparing names. `RTNConfig` is only a
preset of `GPTQConfig` with that algorithm, registered under its own method name so recipes can
write `- {method: rtn}`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, ClassVar

import torch

from ..config import MethodConfig
from ..errors import UsageError
from .algorithm import DEFAULT_SHRINK_GRID, QuantResult, gptq_quantize, rtn_quantize
from ..rotate.config import KINDS as ROTATIONS
from .packing import STREAM_BITS, SUPPORTED_BITS

__all__ = ["ALGORITHMS", "Algorithm", "GPTQConfig", "RTNConfig"]

_OVERRIDABLE = ("bits", "group_size", "desc_act", "sym", "damp_percent", "static_groups")


class Algorithm:
    """How weights are solved for `GPTQConfig.algorithm`: one stateless entry of `ALGORITHMS`."""

    name: ClassVar[str]

    def needs_hessian(self, config: GPTQConfig) -> bool:
        """Whether `quantize` takes the Hessian of the weight's inputs (else it gets None)."""
        raise NotImplementedError

    def act_order(self, config: GPTQConfig) -> bool:
        """Whether the input channels are quantized in act-order."""
        raise NotImplementedError

    def quantize(self, weight: torch.Tensor, H: torch.Tensor | None, config: GPTQConfig) -> QuantResult:
        """Codes, grid and dequantized weight of `weight` [out, in] with `config`'s grid."""
        raise NotImplementedError


class _GPTQ(Algorithm):
    """GPTQ: columns quantized one by one with error feedback through the inverse Hessian."""

    name = "gptq"

    def needs_hessian(self, config):
        return True

    def act_order(self, config):
        return config.desc_act

    def quantize(self, weight, H, config):
        return gptq_quantize(weight, H, config.bits, config.group_size, sym=config.sym, desc_act=config.desc_act,
                             static_groups=config.static_groups, damp_percent=config.damp_percent,
                             shrink_grid=_shrink_grid(config))


class _RoundToNearest(Algorithm):
    """Round to nearest on each group's grid; the Hessian's diagonal only weighs the clip search."""

    name = "rtn"

    def needs_hessian(self, config):
        return config.clip_search

    def act_order(self, config):
        return False

    def quantize(self, weight, H, config):
        return rtn_quantize(weight, config.bits, config.group_size, config.sym, _shrink_grid(config),
                            None if H is None else torch.diag(H))


def _shrink_grid(config: GPTQConfig) -> tuple[float, ...]:
    return DEFAULT_SHRINK_GRID if config.clip_search else (1.0,)


ALGORITHMS: dict[str, Algorithm] = {a.name: a for a in (_GPTQ(), _RoundToNearest())}


@dataclasses.dataclass
class GPTQConfig(MethodConfig):
    """GPTQ (or round-to-nearest) weight quantization into the standard GPTQ checkpoint layout.

    Args:
        bits: 2, 3, 4 or 8.
        group_size: input channels per scale/zero group; -1 for one group per output row. A size
            that does not divide some linear's in_features is halved for the whole checkpoint until
            it does (at least 32; 576 inputs with 128 -> 64), so every reader, vLLM included, gets
            whole groups; the size used is logged and stored.
        partial_groups: keep `group_size` as given where it does not divide in_features, with a
            partial last group (llmshrink and GPTQModel read it, vLLM does not).
        desc_act: act-order: quantize input channels by decreasing Hessian diagonal (saved as g_idx).
            On by default: on the packaged model it halves the perplexity gap of plain GPTQ.
        sym: symmetric grid (zero point 2**(bits-1)); False for an asymmetric one.
        damp_percent: added to the Hessian diagonal, as a fraction of its mean.
        true_sequential: inside a layer, quantize attention before MLP, feeding quantized outputs on.
        static_groups: with desc_act, keep groups contiguous in the original channel order (each
            group's grid fixed before error feedback), so g_idx stays monotone and kernels need no
            reordering. On by default; it also scored best on the packaged model.
        algorithm: "gptq", or "rtn" (round to nearest on the same grid and packing: the baseline;
            `RTNConfig` is the same config with this preset, registered as method `rtn`).
        clip_search: search each group's range for the least Hessian-weighted error.
        dynamic: per-module overrides by regex on the module name, first match wins:
            {"re:.*mlp.down_proj": {"bits": 8}}; {"-:.*lm_head"} style keys ("-:" prefix) skip modules.
        lm_head: also quantize the output head (off by default), as GPTQModel writes it (a tied
            head is untied: the embedding keeps its own tensor).
        rotate: rotate the model first ("hadamard" or "random", as `llmshrink rotate` does) and
            quantize the rotated model: a standard checkpoint of the same architecture.
        target_bits: choose each linear's bits from 2, 3, 4 and 8 to least measured loss under this
            average bits per weight (scales, zeros and g_idx counted), written as `dynamic`; `bits`
            is then only the most common choice. None: every linear at `bits`.
        embed_bits: also quantize the input embedding at these bits, 2 to 8 (the config's group size
            and sym), stored in the GPTQ layout under the embedding's name (5-7 bits in the same bit
            stream as 3 bits: only llmshrink reads a quantized embedding, so it need not keep to
            the widths of GPTQ linears). A tied head (lm_head off)
            shares it, and it is then solved as that head (the algorithm with the head's Hessian);
            else round to nearest with range search. Only llmshrink reads it (transformers too
            after `import llmshrink`; not GPTQModel or vLLM). None keeps it in fp16.
        fp_target: how much of each linear's target is the full-precision model's outputs, 0 to 1.
            GPTQ fits W X~, the weights on the inputs the already-quantized layers give the
            linear; 1 fits the full-precision model's W X instead (GPTAQ's asymmetric calibration,
            which also corrects the error the layers before have left); in between, the exact
            mix (1 - a) ||(Q - W) X~||^2 + a ||Q X~ - W X||^2. Costs a second forward of every
            layer (the full-precision one) and one [in, in] solve per step. 0 (off) by default.
        calib_dtype: dtype of the calibration forwards ("float32", "bfloat16", or "auto":
            bfloat16 on CUDA and on CPUs with native bf16 matmul, AVX512-BF16 or AMX; else
            float32). Hessians are accumulated and weights solved in float32 either way; bf16
            forwards are 2-2.5x faster on such CPUs (GPTQModel also calibrates in bf16 there).
    """

    METHOD = "gptq"
    VERSION = 1

    bits: int = 4
    group_size: int = 128
    desc_act: bool = True
    sym: bool = True
    damp_percent: float = 0.01
    true_sequential: bool = True
    static_groups: bool = True
    algorithm: str = "gptq"
    clip_search: bool = True
    dynamic: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    lm_head: bool = False
    calib_dtype: str = "auto"
    partial_groups: bool = False
    rotate: str | None = None
    target_bits: float | None = None
    embed_bits: int | None = None
    fp_target: float = 0.0

    def validate(self) -> None:
        _check_grid(self.bits, self.group_size, self.damp_percent, where="")
        if self.algorithm not in ALGORITHMS:
            raise UsageError(f"algorithm='{self.algorithm}' is not known; use {' or '.join(map(repr, ALGORITHMS))}")
        if self.calib_dtype not in ("auto", "float32", "bfloat16"):
            raise UsageError(f"calib_dtype='{self.calib_dtype}' is not known; use 'auto', 'float32' or 'bfloat16'")
        if self.rotate is not None and self.rotate not in ROTATIONS:
            raise UsageError(f"rotate='{self.rotate}' is not known; use one of {', '.join(ROTATIONS)} (or leave it off)")
        if self.target_bits is not None:
            if not isinstance(self.target_bits, (int, float)) or not 2 <= self.target_bits <= 8:
                raise UsageError(f"target_bits={self.target_bits} is outside 2..8; give an average between 2 and 8 "
                                 "bits per weight, such as 3.5")
            fixed = [k for k in self.dynamic if not k.startswith("-:")]
            if fixed:
                raise UsageError(f"target_bits writes its own dynamic rules, but dynamic['{fixed[0]}'] overrides "
                                 "some linears; keep only '-:' skip rules with target_bits")
        if not isinstance(self.fp_target, (int, float)) or not 0 <= self.fp_target <= 1:
            raise UsageError(f"fp_target={self.fp_target} is outside 0..1; give the full-precision outputs' share "
                             "of the target, such as 0.25 (0 leaves it off)")
        if self.fp_target and self.algorithm != "gptq":
            raise UsageError(f"fp_target solves GPTQ against the full-precision outputs; algorithm='{self.algorithm}' "
                             "does not solve: use algorithm='gptq' or leave fp_target off")
        if self.embed_bits is not None and self.embed_bits not in STREAM_BITS:
            raise UsageError(f"embed_bits={self.embed_bits} is not supported; use one of "
                             f"{', '.join(map(str, STREAM_BITS))} (or leave it off for fp16 embeddings)")
        for key, overrides in self.dynamic.items():
            pattern = dynamic_pattern(key)
            try:
                re.compile(pattern)
            except re.error as e:
                raise UsageError(f"dynamic key '{key}' is not a valid regex ({e}); write it as 're:<regex>'") from None
            if key.startswith("-:"):
                continue
            bad = [k for k in overrides if k not in _OVERRIDABLE]
            if bad:
                raise UsageError(f"dynamic['{key}'] cannot override '{bad[0]}'; overridable: {', '.join(_OVERRIDABLE)}")
            merged = {**dataclasses.asdict(self), **overrides}
            _check_grid(merged["bits"], merged["group_size"], merged["damp_percent"], where=f" in dynamic['{key}']")

    @property
    def solver(self) -> "Algorithm":
        """The entry of `ALGORITHMS` that `algorithm` names."""
        return ALGORITHMS[self.algorithm]

    @property
    def needs_activations(self) -> bool:
        """Whether quantizing runs calibration forwards (a Hessian of each linear's inputs)."""
        return self.solver.needs_hessian(self)

    @property
    def act_order(self) -> bool:
        """Whether input channels are quantized in act-order (desc_act where the algorithm has one)."""
        return self.solver.act_order(self)

    def for_module(self, name: str) -> "GPTQConfig | None":
        """The config that applies to module `name`, or None if it is skipped."""
        if name.endswith("lm_head") and not self.lm_head:
            return None
        for key, overrides in self.dynamic.items():
            if re.fullmatch(dynamic_pattern(key), name):
                if key.startswith("-:"):
                    return None
                return dataclasses.replace(self, dynamic={}, **overrides)
        return self

    def to_gptq_dynamic(self) -> dict[str, dict[str, Any]]:
        """`dynamic` in the GPTQModel / vLLM checkpoint convention: '+:regex' overrides, '-:regex' skips."""
        out = {}
        for key, overrides in self.dynamic.items():
            out[("-:" if key.startswith("-:") else "+:") + dynamic_pattern(key)] = {} if key.startswith("-:") else dict(overrides)
        return out


@dataclasses.dataclass
class RTNConfig(GPTQConfig):
    """Round-to-nearest quantization: `GPTQConfig` preset to algorithm "rtn" (no calibration
    forwards unless `clip_search`), registered as its own method so pipelines can name the step
    `rtn`. Nothing else tells it apart: the code decides by `algorithm`, as for GPTQConfig."""

    METHOD = "rtn"

    algorithm: str = _RoundToNearest.name

    def validate(self) -> None:
        if self.algorithm != _RoundToNearest.name:
            raise UsageError(f"an rtn step has algorithm='rtn', not '{self.algorithm}'; use a gptq step for GPTQ")
        super().validate()


def dynamic_pattern(key: str) -> str:
    """The regex of a `dynamic` key (its "re:", "+:" or "-:" prefix removed)."""
    for prefix in ("re:", "+:", "-:"):
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def _check_grid(bits: int, group_size: int, damp_percent: float, where: str) -> None:
    if bits not in SUPPORTED_BITS:
        raise UsageError(f"bits={bits}{where} is not supported; use one of {', '.join(map(str, SUPPORTED_BITS))}")
    if not isinstance(group_size, int) or group_size == 0 or group_size < -1:
        raise UsageError(f"group_size={group_size}{where} is invalid; use -1 (one group per row) or a positive size such as 128")
    if not 0 < damp_percent < 1:
        raise UsageError(f"damp_percent={damp_percent}{where} must be between 0 and 1 (0.01 is usual)")
