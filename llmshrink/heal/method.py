"""Healing, registered: LoRA/QLoRA on a dense or quantized model, or every weight of a dense or
factorized one (`full`); writes an adapter, or with `merge` (always with `full`) the model."""

from __future__ import annotations

from pathlib import Path

from ..errors import UsageError
from ..methods import Context, Method, register
from . import format as _format  # noqa: F401  (registers the adapter format)
from . import HealConfig, add_cli, heal

__all__ = ["HEAL"]


def run(source: str, config: HealConfig, out: Path, context: Context) -> None:
    heal(source, config, out, teacher=context.original if config.loss != "ce" else None,
         overwrite=context.overwrite, progress=context.progress)


def check(config: HealConfig, input_kind: str, earlier: list, before: str) -> list[str]:
    if input_kind == "quantized" and config.merge:
        raise UsageError(f"after {before} cannot merge into packed weights; set merge: false (the adapter is kept "
                         "beside the quantized model)")
    if input_kind == "quantized" and config.adapter in ("qlora", "full"):
        raise UsageError(f"after {before}: the model is already quantized; use adapter: lora")
    if not earlier:
        return ["is the first step: nothing has been pruned or quantized yet, so it fine-tunes the original model"]
    return []


def output(config: HealConfig, input_kind: str = "dense") -> str:
    """A merged (or full) heal keeps a factorized model factorized (the adapter merges into both factors)."""
    if not config.writes_model:
        return "adapter"
    return "factorized" if input_kind == "factorized" else "dense"


HEAL = register(Method(config=HealConfig, run=run, output=output, accepts=("dense", "quantized", "factorized"), check=check, headline=("adapter", "loss", "steps"),
                       hub_tags=("lora",), add_cli=add_cli))
