"""One byte plane of a chunk as one stored piece, and back (the container is in `codec.py`).

Codec of a piece: 0 = raw, 1 = one zstd frame with its content size. Each plane is coded with
zstd tuned to be a Huffman literal coder (fast strategy, 7-byte minimum match, 64-entry hash
table: within ~2% of the order-0 entropy, decoded at GB/s) and, unless `level` is 0, also with
zstd at `level`, kept if >= 3% smaller (runs of zeros in pruned weights, repeated rows). A piece
that does not shrink by >= 1% is stored raw: near-random mantissa bytes cost a copy to decode.

Chunks are coded on parallel threads: each thread keeps its own zstd (de)compressors and
scratch buffers, reused across chunks, and reads a piece with `pread` straight into its target.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import xxhash
import zstandard

from ..errors import UsageError

__all__ = ["RAW", "ZSTD", "DIGEST_BYTES", "corrupt", "compressor", "code_plane", "chunk_digest", "pread_into",
           "scratch", "decode_piece"]

RAW, ZSTD = 0, 1
DIGEST_BYTES = 16  # a chunk's digest: the XXH3-128 of its original bytes
_LITERALS = zstandard.ZstdCompressionParameters(strategy=zstandard.STRATEGY_FAST, min_match=7, window_log=20,
                                               hash_log=6, chain_log=6, search_log=1)
_local = threading.local()  # zstd (de)compressors and scratch buffers: one per thread


def corrupt(path: Path, what: str) -> UsageError:
    """The error for a damaged container `path`, saying `what` is wrong with it."""
    return UsageError(f"{path} is truncated or corrupt ({what}); re-create it with 'llmshrink pack' "
                      "from the original checkpoint")


def compressor(level: int) -> zstandard.ZstdCompressor:
    """This thread's zstd compressor at `level` (0: the Huffman literal coder)."""
    if not hasattr(_local, "compressors"):
        _local.compressors = {}
    if level not in _local.compressors:
        params = _LITERALS if level == 0 else zstandard.ZstdCompressionParameters.from_level(level)
        _local.compressors[level] = zstandard.ZstdCompressor(compression_params=params)
    return _local.compressors[level]


def code_plane(plane: np.ndarray, level: int) -> tuple[int, bytes | np.ndarray]:
    """(codec, stored bytes) of one plane: the smaller zstd candidate, or raw if it hardly shrinks."""
    best = compressor(0).compress(plane)
    if level:
        other = compressor(level).compress(plane)
        if len(other) < 0.97 * len(best):
            best = other
    return (ZSTD, best) if len(best) < 0.99 * plane.nbytes else (RAW, plane)


def chunk_digest(data: bytes | np.ndarray) -> bytes:
    """A chunk's digest: XXH3-128, a non-cryptographic checksum that catches corruption at ~3x
    sha256's speed (decoding verifies every chunk); the whole-file sha256 stays the identity."""
    return xxhash.xxh3_128(data).digest()


def pread_into(fd: int, target: np.ndarray, offset: int) -> None:
    """Fill `target` with the bytes of `fd` from `offset` on."""
    view, done = memoryview(target).cast("B"), 0
    while done < len(view):  # pread may return short counts
        if hasattr(os, "preadv"):  # straight into `target`
            got = os.preadv(fd, [view[done:]], offset + done)
        else:
            data = os.pread(fd, len(view) - done, offset + done)
            got = len(data)
            view[done:done + got] = data
        if got <= 0:
            raise OSError(f"unexpected end of file at byte {offset + done}")
        done += got


def scratch(name: str, nbytes: int) -> np.ndarray:
    """A per-thread uint8 buffer of `nbytes`, reused across chunks (fresh buffers for every chunk
    cost more in page faults than the decoding itself)."""
    buf = getattr(_local, name, None)
    if buf is None or buf.nbytes < nbytes:
        buf = np.empty(nbytes, np.uint8)
        setattr(_local, name, buf)
    return buf[:nbytes]


def decode_piece(path: Path, fd: int, codec: int, offset: int, length: int, target: np.ndarray) -> None:
    """Decode one stored piece into `target` ([n] uint8), checking its lengths."""
    n = target.nbytes
    if codec == RAW:
        if length != n:
            raise corrupt(path, f"a raw piece has {length} bytes, expected {n}")
        pread_into(fd, target, offset)
        return
    blob = scratch("blob", length)
    pread_into(fd, blob, offset)
    try:
        if zstandard.frame_content_size(blob) != n:
            raise corrupt(path, f"a zstd piece does not decode to the expected {n} bytes")
        if not hasattr(_local, "dctx"):
            _local.dctx = zstandard.ZstdDecompressor()
        reader = _local.dctx.stream_reader(blob, read_size=length, read_across_frames=False)
        view, done = memoryview(target), 0
        while done < n and (got := reader.readinto(view[done:])):  # straight into target: no copy
            done += got
    except zstandard.ZstdError as e:
        raise corrupt(path, f"zstd: {e}") from None
    if done != n:
        raise corrupt(path, f"a zstd piece decoded to {done} bytes, expected {n}")
