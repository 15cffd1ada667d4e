"""Delta compression, registered: the step's input stored as a difference from the run's original."""

from __future__ import annotations

from pathlib import Path

from ..errors import UsageError
from ..methods import Context, Method, method_for, register
from . import format as _format  # noqa: F401  (registers the delta format)
from .cli import add_cli
from .compress import compress_delta
from .config import DeltaConfig

__all__ = ["DELTA"]


def run(source: str, config: DeltaConfig, out: Path, context: Context) -> None:
    if context.original is None or context.original == source:
        raise UsageError("a delta step stores its input as a difference from the original model; give the "
                         "original (compress(..., original=BASE), or a recipe whose model is the base)")
    compress_delta(context.original, source, config, out, overwrite=context.overwrite, progress=context.progress,
                   **context.calibration_kwargs())


def check(config: DeltaConfig, input_kind: str, earlier: list, before: str) -> list[str]:
    reshaped = [step.METHOD for step in earlier if method_for(step).changes_architecture]
    if reshaped:
        raise UsageError(f"stores a difference from the recipe's model, but an earlier {reshaped[0]} changed the "
                         f"architecture; put delta in a recipe without {reshaped[0]} steps")
    return []


DELTA = register(Method(config=DeltaConfig, run=run, output="delta", check=check,
                        needs_calibration=lambda config: config.distill_steps > 0, headline=("codec",),
                        hub_tags=("delta",), add_cli=add_cli))
