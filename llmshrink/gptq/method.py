"""GPTQ and RTN, registered: the pipeline, the CLI and the card read these two descriptors."""

from __future__ import annotations

from pathlib import Path

from ..methods import Context, Method, register
from . import format as _format  # noqa: F401  (registers the quantized format)
from .cli import add_cli
from .config import GPTQConfig, RTNConfig
from .quantize import quantize

__all__ = ["GPTQ", "RTN"]


def run(source: str, config: GPTQConfig, out: Path, context: Context) -> None:
    quantize(source, config, out, seed=context.seed, progress=context.progress, overwrite=context.overwrite,
             **context.calibration_kwargs())


def needs_calibration(config: GPTQConfig) -> bool:
    return config.needs_activations or config.target_bits is not None  # Hessians, range search or sensitivity


GPTQ = register(Method(config=GPTQConfig, run=run, output="quantized", accepts=("dense", "factorized"),
                       needs_calibration=needs_calibration,
                       headline=("bits", "group_size"), hub_tags=("gptq",), add_cli=add_cli))
RTN = register(Method(config=RTNConfig, run=run, output="quantized", accepts=("dense", "factorized"),
                      needs_calibration=needs_calibration,
                      headline=("bits", "group_size"), hub_tags=("rtn",)))
