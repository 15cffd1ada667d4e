"""Lossless packing of checkpoint folders (`llmshrink pack` / `llmshrink unpack`).

folder.py walks folders, writes manifests and materializes packed folders; codec.py is the
container of one safetensors file, whose chunks planes.py splits into byte planes and pieces.py
codes with zstd; config.py holds PackConfig, cli.py the two sub-commands."""

from .cli import add_cli
from .config import PackConfig
from .folder import MANIFEST, SUFFIX, PackSummary, is_packed_folder, materialize, pack, pack_folder, unpack_folder

__all__ = ["MANIFEST", "SUFFIX", "PackConfig", "PackSummary", "add_cli", "is_packed_folder", "materialize", "pack",
           "pack_folder", "unpack_folder"]
