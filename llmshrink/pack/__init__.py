"""Lossless packing of checkpoint folders (`llmshrink pack` / `llmshrink unpack`): core.py walks
folders and writes manifests, codec.py is the byte-plane + zstd container."""

from .core import (MANIFEST, SUFFIX, PackConfig, PackSummary, add_cli, is_packed_folder, materialize, pack, pack_folder,
                   unpack_folder)

__all__ = ["MANIFEST", "SUFFIX", "PackConfig", "PackSummary", "add_cli", "is_packed_folder", "materialize", "pack",
           "pack_folder", "unpack_folder"]
