"""The delta folder format (see load.py for its files): loads as its base plus the stored
difference; its tokenizer is the base's."""

from __future__ import annotations

from pathlib import Path

import torch

from ..formats import Format, LoadRequest, register_format
from .load import is_delta_folder, load_delta_model, locate_base, read_meta

__all__ = ["DELTA_FORMAT"]


def _load(folder: Path, request: LoadRequest):
    return load_delta_model(folder, base_model=request.base_model, dtype=request.dtype or torch.float32,
                            **request.kwargs)


DELTA_FORMAT = register_format(Format(
    name="delta", priority=20, detect=is_delta_folder, load=_load,
    tokenizer_folder=lambda folder: str(locate_base(read_meta(folder))),
    describe=lambda folder: ("llmshrink", ["delta-compression"]),
    refusal="{name} cannot follow delta: a delta folder is a difference, not weights to compress further; "
            "put delta last (or before pack)"))
