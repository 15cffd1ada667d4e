"""Full fine-tuning, registered: a dense model in, a dense model out."""

from __future__ import annotations

from pathlib import Path

from ..methods import Context, Method, register
from . import FinetuneConfig, finetune

__all__ = ["FINETUNE"]


def run(source: str, config: FinetuneConfig, out: Path, context: Context) -> None:
    finetune(source, config, out, progress=context.progress)


FINETUNE = register(Method(config=FinetuneConfig, run=run, output="dense", headline=("steps",),
                           hub_tags=("finetune",)))
