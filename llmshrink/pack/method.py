"""Packing, registered: any folder in, the same bytes entropy-coded out; nothing may follow it."""

from __future__ import annotations

from pathlib import Path

from ..methods import Context, Method, register
from . import format as _format  # noqa: F401  (registers the packed format)
from .cli import add_cli
from .config import PackConfig
from .folder import pack

__all__ = ["PACK"]


def run(source: str, config: PackConfig, out: Path, context: Context) -> None:
    pack(source, config, out, overwrite=context.overwrite, progress=context.progress)


PACK = register(Method(config=PackConfig, run=run, output="packed", accepts=("*",), headline=("level",),
                       hub_tags=("pack",), add_cli=add_cli))
