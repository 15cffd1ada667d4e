"""The `llmshrink pack` and `llmshrink unpack` sub-commands."""

from __future__ import annotations

import argparse

from .codec import DEFAULT_LEVEL
from .folder import pack_folder, unpack_folder

__all__ = ["add_cli"]


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def _cmd_pack(args: argparse.Namespace) -> int:
    s = pack_folder(args.model, args.out, level=args.level, threads=args.threads, overwrite=args.overwrite,
                    progress=True)
    print(f"packed {s.files} safetensors file(s): {_mb(s.tensor_bytes)} -> {_mb(s.packed_bytes)} ({s.ratio:.3f}x); "
          f"folder {_mb(s.folder_bytes_in)} -> {_mb(s.folder_bytes_out)}; {s.seconds:.1f} s; written to {s.out}")
    return 0


def _cmd_unpack(args: argparse.Namespace) -> int:
    s = unpack_folder(args.packed, args.out, threads=args.threads, overwrite=args.overwrite, progress=True,
                      verify="both" if args.verify_file else "chunks")
    rate = s.tensor_bytes / max(s.seconds, 1e-9) / 1e9
    checked = "chunk and whole-file sha256" if args.verify_file else "chunk sha256"
    print(f"unpacked {s.files} safetensors file(s): {_mb(s.packed_bytes)} -> {_mb(s.tensor_bytes)} ({s.ratio:.3f}x), "
          f"{checked} verified; {s.seconds:.1f} s ({rate:.2f} GB/s); written to {s.out}")
    return 0


def _count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"'{text}' is not a positive whole number")
    return int(text)


def _level(text: str) -> int:
    if not text.isdigit() or int(text) > 22:
        raise argparse.ArgumentTypeError(f"'{text}' is not a zstd level; use 1-22, or 0 for Huffman literals only")
    return int(text)


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add the `pack` and `unpack` sub-commands to llmshrink's command line."""
    p = subparsers.add_parser("pack", help="lossless compression of a safetensors checkpoint folder",
                              description="Entropy-code every safetensors file of a folder (byte planes + zstd); "
                                          "'llmshrink unpack' restores it byte for byte.")
    p.add_argument("model", metavar="DIR", help="checkpoint folder (single or sharded safetensors)")
    p.add_argument("--out", required=True, help="packed folder to write")
    p.add_argument("--level", type=_level, default=DEFAULT_LEVEL,
                   help=f"zstd level tried on each chunk beside Huffman-only coding; higher packs slower, "
                        f"0 = Huffman only (default {DEFAULT_LEVEL})")
    p.add_argument("--threads", type=_count, help="coding threads (default: all CPUs)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=_cmd_pack)

    p = subparsers.add_parser("unpack", help="restore a packed checkpoint folder byte for byte",
                              description="Decode a folder written by 'llmshrink pack', checking every chunk "
                                          "against its recorded sha256.")
    p.add_argument("packed", metavar="DIR", help="folder written by 'llmshrink pack'")
    p.add_argument("--out", required=True, help="checkpoint folder to write")
    p.add_argument("--threads", type=_count, help="decoding threads (default: all CPUs)")
    p.add_argument("--verify-file", action="store_true",
                   help="also recompute each file's whole sha256 (the Hub's LFS hash) and compare it with the "
                        "recorded one; slower, sequential")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=_cmd_unpack)
