"""Rotation, registered: a dense model in, a dense model of the same architecture out."""

from __future__ import annotations

from pathlib import Path

from ..auto import load_model
from ..cliargs import add_method_command
from ..io import atomic_dir
from ..methods import Context, Method, register
from .apply import rotate_model
from .config import RotateConfig

__all__ = ["ROTATE"]


def run(source: str, config: RotateConfig, out: Path, context: Context) -> None:
    model, tokenizer, _ = load_model(source)
    rotate_model(model, config)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def add_cli(subparsers) -> None:
    add_method_command(subparsers, ROTATE, "rotate", "rotate the residual stream (and heads) by orthogonal matrices "
                                                    "folded into the weights, before quantizing")


ROTATE = register(Method(config=RotateConfig, run=run, output="dense", headline=("kind", "heads"),
                         hub_tags=("rotated",), record="llmshrink_rotate", add_cli=add_cli))
