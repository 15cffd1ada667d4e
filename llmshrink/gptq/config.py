"""`GPTQConfig`: how to quantize, per model and per module."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from ..config import MethodConfig
from ..errors import UsageError
from .packing import SUPPORTED_BITS

__all__ = ["GPTQConfig", "RTNConfig"]

_OVERRIDABLE = ("bits", "group_size", "desc_act", "sym", "damp_percent", "static_groups")


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
        lm_head: also quantize the output head (off by default).
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

    def validate(self) -> None:
        _check_grid(self.bits, self.group_size, self.damp_percent, where="")
        if self.algorithm not in ("gptq", "rtn"):
            raise UsageError(f"algorithm='{self.algorithm}' is not known; use 'gptq' or 'rtn'")
        if self.calib_dtype not in ("auto", "float32", "bfloat16"):
            raise UsageError(f"calib_dtype='{self.calib_dtype}' is not known; use 'auto', 'float32' or 'bfloat16'")
        for key, overrides in self.dynamic.items():
            pattern = _pattern(key)
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

    def for_module(self, name: str) -> "GPTQConfig | None":
        """The config that applies to module `name`, or None if it is skipped."""
        if name.endswith("lm_head") and not self.lm_head:
            return None
        for key, overrides in self.dynamic.items():
            if re.fullmatch(_pattern(key), name):
                if key.startswith("-:"):
                    return None
                return dataclasses.replace(self, dynamic={}, **overrides)
        return self

    def to_gptq_dynamic(self) -> dict[str, dict[str, Any]]:
        """`dynamic` in the GPTQModel / vLLM checkpoint convention: '+:regex' overrides, '-:regex' skips."""
        out = {}
        for key, overrides in self.dynamic.items():
            out[("-:" if key.startswith("-:") else "+:") + _pattern(key)] = {} if key.startswith("-:") else dict(overrides)
        return out


@dataclasses.dataclass
class RTNConfig(GPTQConfig):
    """Round-to-nearest quantization: `GPTQConfig` with algorithm "rtn" (no calibration forwards
    unless `clip_search`), registered as its own method so pipelines can name the step `rtn`."""

    METHOD = "rtn"

    algorithm: str = "rtn"

    def validate(self) -> None:
        if self.algorithm != "rtn":
            raise UsageError(f"an rtn step has algorithm='rtn', not '{self.algorithm}'; use a gptq step for GPTQ")
        super().validate()


def _pattern(key: str) -> str:
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
