"""The packed format: a folder written by `llmshrink pack` stands for the plain folder it decodes
to (once, into the cache); it is described and loaded as that folder's own format."""

from __future__ import annotations

from pathlib import Path

from ..formats import Format, LoadRequest, detect, open_folder, register_format
from ..io import folder_size
from .folder import SUFFIX, is_packed_folder, materialize

__all__ = ["PACKED_FORMAT"]


def _load(folder: Path, request: LoadRequest):
    plain, fmt = open_folder(folder)
    return fmt.load(plain, request)


def _describe(folder: Path) -> tuple[str, list[str]]:
    library, tags = detect(folder, skip=("packed",)).describe(folder)  # config files are copied as they are
    return library, [*tags, "llmshrink-packed"]


PACKED_FORMAT = register_format(Format(
    name="packed", priority=10, detect=is_packed_folder, load=_load, unwrap=lambda folder: materialize(folder),
    describe=_describe, weight_bytes=lambda folder: folder_size(folder, suffixes=(".safetensors", ".bin", SUFFIX)),
    transformers_loads=False, final=True,
    refusal="{name} follows pack; pack must be the last step (it only stores bytes smaller)"))
