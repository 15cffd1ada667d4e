"""Rotation, registered: a dense model in, a dense model of the same architecture out."""

from __future__ import annotations

from pathlib import Path

import torch

from ..auto import AutoModelForCausalLM, load_tokenizer
from ..cliargs import add_method_command
from ..io import atomic_dir, copy_tokenizer_files
from ..models import resolve_model
from ..methods import Context, Method, register
from .apply import rotate_model
from .config import RotateConfig

__all__ = ["ROTATE", "rotate_folder"]


def rotate_folder(source: str | Path, config: RotateConfig, out: Path) -> None:
    """Rotate the model `source` names (a folder, packaged name or Hub id) and save it at `out`,
    with the tokenizer files of a source folder (a folder without any is rotated without them)."""
    resolved = resolve_model(str(source))
    model = AutoModelForCausalLM.from_pretrained(resolved, dtype=torch.float32).eval()
    rotate_model(model, config)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        if not Path(resolved).is_dir():
            load_tokenizer(resolved).save_pretrained(tmp)
        else:
            copy_tokenizer_files(resolved, tmp)


def run(source: str, config: RotateConfig, out: Path, context: Context) -> None:
    rotate_folder(source, config, out)


def add_cli(subparsers) -> None:
    add_method_command(subparsers, ROTATE, "rotate", "rotate the residual stream (and heads) by orthogonal matrices "
                                                    "folded into the weights, before quantizing")


ROTATE = register(Method(config=RotateConfig, run=run, output="dense", headline=("kind", "heads"),
                         hub_tags=("rotated",), record="llmshrink_rotate", add_cli=add_cli))
