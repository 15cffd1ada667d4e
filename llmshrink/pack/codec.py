"""Lossless entropy coding of one safetensors file: rotated byte planes + zstd, decoded in parallel.

The container (`<name>.safetensors.llmpack`) holds every byte of the original file, so decoding
gives it back byte for byte (checked chunk by chunk). Its layout, integers little-endian:

    [0, 8)            MAGIC = b"LLMPACK\\0"
    [8, 8 + P)        payload: the coded pieces back to back, in table order
    [8 + P, E - 16)   the table: one zstd frame (with its checksum) of UTF-8 JSON (below), T bytes
    [E - 16, E - 8)   T as u64
    [E - 8, E)        MAGIC again (a truncated file has none)

    table = {"format": "llmshrink-pack", "version": 1, "size": original bytes, "sha256": hex,
             "segments": [{"start": byte offset in the original, "length": bytes,
                           "kind": "float" | "int" | "bytes", "width": bytes per element,
                           "rot": bits rotated, "chunk": elements per chunk,
                           "pieces": [[codec, stored bytes], ...],
                           "digests": [hex, ...]}, ...]}

Segments tile the original file in order: the safetensors header (8-byte length + JSON) and any
bytes between or after tensors are "bytes" segments (width 1); each non-empty tensor is one
segment (chunks that start where a tensor starts code better than chunks across tensors). A
segment of n elements is cut into chunks of `chunk` elements; a chunk becomes `width` byte
planes, one piece each (chunk-major: chunk 0 plane 0, chunk 0 plane 1, ..., chunk 1 plane 0).
Pieces are independent, so chunks decode on parallel threads.

Integrity: `digests` holds, per chunk, the XXH3-128 checksum of that chunk's original bytes
(16 bytes, non-cryptographic, ~3x faster than sha256 here), and the decoding thread checks it,
so verification runs in parallel and no byte is handed out unchecked. "sha256" is the whole original file's (the Hugging Face Hub's LFS hash): the
file's identity, computed while encoding; decoding recomputes it only when asked
(`verify="file"` or `"both"`, `llmshrink unpack --verify-file`). The chunk digests catch any
damage to the payload, the table frame's checksum any to the table; only the whole-file sha256
also guards against a container deliberately rewritten with a consistent forged table.

The pieces: `planes.py` splits a chunk into byte planes (and picks each tensor's rotation),
`pieces.py` codes each plane (zstd or raw) and decodes it back.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import json
import logging
import os
import queue
import struct
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator, NamedTuple

import numpy as np
import zstandard

from ..errors import UsageError
from .pieces import DIGEST_BYTES, RAW, ZSTD, chunk_digest, code_plane, corrupt, decode_piece, scratch
from .planes import UINT, choose_rotation, from_planes, to_planes

__all__ = ["FORMAT", "VERSION", "DEFAULT_LEVEL", "DEFAULT_CHUNK", "VERIFY", "encode_file", "iter_decoded",
           "decode_file", "decode_to_file", "read_table"]

log = logging.getLogger(__name__)

FORMAT = "llmshrink-pack"
VERSION = 1
MAGIC = b"LLMPACK\x00"
DEFAULT_LEVEL = 3  # zstd level of the match-finding candidate; 0 = Huffman literals only
DEFAULT_CHUNK = 1 << 18  # elements per chunk: 256 KiB per plane, so a chunk's working set stays in L2
_MAX_TABLE = 1 << 30
VERIFY = ("chunks", "file", "both")  # what decoding checks: chunk digests, the whole-file sha256, or both

# safetensors dtype -> (kind, bytes per element); anything else is coded as plain bytes
_DTYPES = {"F16": ("float", 2), "BF16": ("float", 2), "F32": ("float", 4), "F64": ("float", 8),
           "I16": ("int", 2), "U16": ("int", 2), "I32": ("int", 4), "U32": ("int", 4),
           "I64": ("int", 8), "U64": ("int", 8)}


class Segment(NamedTuple):
    """A byte range [start, start + length) of the original file and how it is coded."""

    start: int
    length: int
    kind: str  # "float" | "int" | "bytes"
    width: int  # bytes per element (1 for "bytes")
    rot: int = 0  # bits each element is rotated left before the plane split


# ---------------------------------------------------------------------------------------------
# safetensors layout


def _segments(path: Path, f: BinaryIO, size: int) -> list[Segment]:
    """Cut a safetensors file into header / tensor / gap segments covering every byte in order."""
    bad = f"{path} is not a valid safetensors file"
    if size < 8:
        raise UsageError(f"{bad}: {size} bytes, shorter than the 8-byte header length; re-download or re-save it")
    f.seek(0)
    (n,) = struct.unpack("<Q", f.read(8))
    if 8 + n > size:
        raise UsageError(f"{bad}: its header claims {n} bytes but the file has {size}; it may be truncated")
    try:
        header = json.loads(f.read(n))
        tensors = sorted((8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1], v["dtype"])
                         for k, v in header.items() if k != "__metadata__")
    except (ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
        raise UsageError(f"{bad}: unreadable JSON header ({e}); re-download or re-save it") from None
    segments = [Segment(0, 8 + n, "bytes", 1)]
    cursor = 8 + n
    for start, end, dtype in tensors:
        if not (isinstance(start, int) and isinstance(end, int) and n + 8 <= start <= end <= size):
            raise UsageError(f"{bad}: a tensor's data_offsets point outside the file; it may be truncated")
        if start > cursor:  # bytes no tensor claims
            segments.append(Segment(cursor, start - cursor, "bytes", 1))
        kind, width = _DTYPES.get(dtype, ("bytes", 1))
        if start < cursor or (end - start) % width:  # overlapping or ragged: keep the new bytes as bytes
            kind, width, start = "bytes", 1, max(start, cursor)
        if end > start:
            segments.append(Segment(start, end - start, kind, width))
        cursor = max(cursor, end)
    if cursor < size:
        segments.append(Segment(cursor, size - cursor, "bytes", 1))
    return segments


# ---------------------------------------------------------------------------------------------
# ordered parallel map with a bounded number of chunks in flight


def _ordered(pool: ThreadPoolExecutor, fn: Callable, jobs: Iterable, window: int) -> Iterator:
    pending: collections.deque[Future] = collections.deque()
    try:
        for job in jobs:
            pending.append(pool.submit(fn, job))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for f in pending:
            f.cancel()


def _chunks(length: int, width: int, chunk: int) -> list[int]:
    """Elements in each chunk of a segment."""
    n = length // width
    return [min(chunk, n - i) for i in range(0, n, chunk)]


# ---------------------------------------------------------------------------------------------
# encode


def _encode_chunk(job: tuple[bytes, int, int, int]) -> tuple[int, bytes, list[tuple[int, bytes | np.ndarray]]]:
    """[n * width] bytes -> (bytes, digest, one (codec, stored bytes) per byte plane)."""
    data, width, rot, level = job
    return len(data), chunk_digest(data), [code_plane(p, level) for p in to_planes(data, width, rot)]


def encode_file(src: str | os.PathLike, dst: str | os.PathLike, level: int = DEFAULT_LEVEL, threads: int | None = None,
                chunk: int = DEFAULT_CHUNK, progress: Callable[[int], None] | None = None) -> dict:
    """Code one safetensors file into a container at `dst`.

    Args:
        src: the safetensors file (any dtypes, any writer).
        dst: the container to write (the caller makes it atomic, e.g. inside `atomic_dir`).
        level: zstd level of the match-finding candidate (1-22), 0 for Huffman literals only.
        threads: coding threads (default os.cpu_count()).
        chunk: elements per chunk, i.e. the bytes of one plane piece.
        progress: called with the number of original bytes done after each chunk.
    Returns:
        {"size": original bytes, "sha256": hex, "packed_size": container bytes}.
    """
    src, dst = Path(src), Path(dst)
    if not 0 <= level <= 22:
        raise UsageError(f"level={level} is not a zstd level; use 1-22, or 0 for Huffman literals only")
    threads = threads or os.cpu_count() or 1
    sha = hashlib.sha256()
    table_segments = []
    with open(src, "rb") as f, open(dst, "wb") as out, ThreadPoolExecutor(threads) as pool:
        size = os.fstat(f.fileno()).st_size
        segments = _segments(src, f, size)
        f.seek(0)
        out.write(MAGIC)
        for seg in segments:
            if seg.width > 1:
                seg = seg._replace(rot=choose_rotation(f.fileno(), seg.start, seg.length, seg.width))
            pieces: list[list[int]] = []
            digests: list[str] = []

            def jobs(seg: Segment = seg) -> Iterator[tuple[bytes, int, int, int]]:
                for n in _chunks(seg.length, seg.width, chunk):  # the file is read once, in order
                    data = f.read(n * seg.width)
                    if len(data) != n * seg.width:
                        raise UsageError(f"{src} changed size while it was being packed")
                    sha.update(data)
                    yield data, seg.width, seg.rot, level

            for nbytes, digest, coded in _ordered(pool, _encode_chunk, jobs(), 2 * threads + 2):
                digests.append(digest.hex())
                for codec, blob in coded:
                    out.write(blob)
                    pieces.append([codec, len(blob) if codec == ZSTD else blob.nbytes])
                if progress:
                    progress(nbytes)
            table_segments.append({**seg._asdict(), "chunk": chunk, "pieces": pieces, "digests": digests})
        table = json.dumps({"format": FORMAT, "version": VERSION, "size": size, "sha256": sha.hexdigest(),
                            "segments": table_segments}, separators=(",", ":")).encode()
        table = zstandard.ZstdCompressor(level=19, write_checksum=True).compress(table)
        out.write(table)
        out.write(struct.pack("<Q", len(table)))
        out.write(MAGIC)
    packed = dst.stat().st_size
    log.debug("packed %s: %d -> %d bytes (%.3fx)", src.name, size, packed, size / max(packed, 1))
    return {"size": size, "sha256": sha.hexdigest(), "packed_size": packed}


# ---------------------------------------------------------------------------------------------
# decode


def _read_table(path: Path, f: BinaryIO) -> dict:
    size = os.fstat(f.fileno()).st_size
    if size < 24:
        raise corrupt(path, f"{size} bytes, shorter than an empty container")
    f.seek(0)
    head = f.read(8)
    f.seek(size - 16)
    tail = f.read(16)
    if head != MAGIC or tail[8:] != MAGIC:
        raise corrupt(path, "no llmpack magic at both ends")
    (tlen,) = struct.unpack("<Q", tail[:8])
    if tlen > size - 24:
        raise corrupt(path, "table length past the start of the file")
    f.seek(size - 16 - tlen)
    blob = f.read(tlen)
    try:
        plausible = 0 <= zstandard.frame_content_size(blob) <= _MAX_TABLE
        table = json.loads(zstandard.ZstdDecompressor().decompress(blob)) if plausible else None
    except (ValueError, zstandard.ZstdError) as e:
        raise corrupt(path, f"unreadable table: {e}") from None
    if not isinstance(table, dict) or table.get("format") != FORMAT or not isinstance(table.get("version"), int):
        raise corrupt(path, f"not an {FORMAT} table")
    if table["version"] > VERSION:
        raise UsageError(f"{path} was written by a newer llmshrink (pack format version {table['version']}; "
                         f"this one reads up to {VERSION}); upgrade llmshrink to read it")
    problem, cursor, stored = None, 0, 0
    try:  # every byte of the original covered once, every piece accounted for
        for seg in table["segments"]:
            n, rem = divmod(seg["length"], seg["width"])
            chunks = -(-n // seg["chunk"]) if seg["chunk"] > 0 else 0
            if (seg["start"] != cursor or rem or n <= 0 or seg["chunk"] <= 0 or seg["width"] not in UINT
                    or not 0 <= seg["rot"] < 8 * seg["width"] or (seg["width"] == 1 and seg["rot"])):
                problem = "segments do not tile the original file"
            elif len(seg["pieces"]) != chunks * seg["width"]:
                problem = "wrong number of pieces in a segment"
            elif len(seg["digests"]) != chunks or any(len(bytes.fromhex(d)) != DIGEST_BYTES for d in seg["digests"]):
                problem = "wrong number or size of chunk digests in a segment"
            elif not all(codec in (RAW, ZSTD) and isinstance(length, int) and length >= 0
                         for codec, length in seg["pieces"]):
                problem = "a piece with an unknown codec or a negative length"
            stored += sum(length for _, length in seg["pieces"])
            cursor += seg["length"]
        if not problem and (cursor != table["size"] or 8 + stored + tlen + 16 != size):
            problem = f"{size} bytes, expected {8 + stored + tlen + 16} for {table['size']} original bytes"
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
        problem = f"malformed table: {e!r}"
    if problem:
        raise corrupt(path, problem)
    return table


def read_table(path: str | os.PathLike) -> dict:
    """The table of a container, after checking its magic, lengths and segment layout."""
    with open(path, "rb") as f:
        return _read_table(Path(path), f)


class _Job(NamedTuple):
    """One chunk to decode: `n` elements of `width` bytes from its pieces (codec, offset, length),
    starting at byte `start` of the original; checked against `digest` unless it is None."""

    width: int
    rot: int
    n: int
    pieces: list[tuple[int, int, int]]
    start: int
    digest: bytes | None


def _decode_chunk(path: Path, fd: int, ring: queue.SimpleQueue, job: _Job) -> np.ndarray:
    """Decode and check a chunk into a buffer taken from `ring` (or a new one); returns [n * width] uint8."""
    nbytes = job.n * job.width
    try:
        buf = ring.get_nowait()
    except queue.Empty:
        buf = np.empty(0, np.uint8)
    if buf.nbytes < nbytes:
        buf = np.empty(nbytes, np.uint8)
    out = buf[:nbytes]
    if job.width == 1:
        decode_piece(path, fd, *job.pieces[0], out)
    else:
        planes = scratch("planes", nbytes).reshape(job.width, job.n)  # [width, n] uint8
        for k, piece in enumerate(job.pieces):
            decode_piece(path, fd, *piece, planes[k])
        dtype = UINT[job.width]
        from_planes(planes, job.rot, out.view(dtype), scratch("tmp", nbytes).view(dtype))
    if job.digest is not None and chunk_digest(out) != job.digest:  # in this thread, while `out` is in cache
        raise corrupt(path, f"original bytes [{job.start}, {job.start + nbytes}) decode to a different sha256 "
                            "than recorded")
    return out


def iter_decoded(path: str | os.PathLike, threads: int | None = None, verify: str = "chunks") -> Iterator[memoryview]:
    """Yield the original file's bytes in order, a chunk at a time, decoded on `threads` threads.

    Each view is valid until the next one is requested (the buffers are reused).

    Args:
        path: the container.
        threads: decoding threads (default os.cpu_count()).
        verify: "chunks" (default): each chunk is checked against its recorded digest by the thread
            that decoded it, before it is yielded. "file": the sha256 of the whole original is
            recomputed here and checked after the last chunk, so what was yielded is unverified
            until the iterator is exhausted. "both": both checks.
    Raises:
        UsageError: the container is truncated or corrupt, or a check fails.
    """
    path = Path(path)
    if verify not in VERIFY:
        raise UsageError(f"verify={verify!r} is not a check; use 'chunks' (each chunk's sha256, in parallel; "
                         "the default), 'file' (the whole file's sha256) or 'both'")
    threads = threads or os.cpu_count() or 1
    sha = hashlib.sha256() if verify in ("file", "both") else None
    ring: queue.SimpleQueue = queue.SimpleQueue()  # output buffers the consumer is done with
    with open(path, "rb") as f, ThreadPoolExecutor(threads) as pool:
        table = _read_table(path, f)
        chunk_digests = verify in ("chunks", "both")

        def jobs() -> Iterator[_Job]:
            offset = 8  # the payload starts after the leading magic
            for seg in table["segments"]:
                lengths, digests, start = iter(seg["pieces"]), iter(seg["digests"]), seg["start"]
                for n in _chunks(seg["length"], seg["width"], seg["chunk"]):
                    pieces = []
                    for codec, length in (next(lengths) for _ in range(seg["width"])):
                        pieces.append((codec, offset, length))
                        offset += length
                    digest = bytes.fromhex(next(digests)) if chunk_digests else None
                    yield _Job(seg["width"], seg["rot"], n, pieces, start, digest)
                    start += n * seg["width"]

        decode = functools.partial(_decode_chunk, path, f.fileno(), ring)
        for out in _ordered(pool, decode, jobs(), 2 * threads + 2):
            view = memoryview(out)
            if sha is not None:
                sha.update(view)
            yield view
            ring.put(out.base if out.base is not None else out)
    if sha is not None and sha.hexdigest() != table["sha256"]:
        raise corrupt(path, "sha256 of the decoded file differs from the recorded one")


def decode_to_file(src: str | os.PathLike, dst: str | os.PathLike, threads: int | None = None,
                   progress: Callable[[int], None] | None = None, verify: str = "chunks") -> int:
    """Decode a container into `dst` (the caller makes it atomic); returns the bytes written.
    `verify` is as for `iter_decoded`."""
    written = 0
    with open(dst, "wb") as f:
        for view in iter_decoded(src, threads, verify):
            f.write(view)
            written += len(view)
            if progress:
                progress(len(view))
    return written


def decode_file(path: str | os.PathLike, threads: int | None = None, verify: str = "chunks") -> bytes:
    """The original file's bytes, verified (for tests and benchmarks; big files: `decode_to_file`).
    `verify` is as for `iter_decoded`."""
    out = bytearray()
    for view in iter_decoded(path, threads, verify):
        out += view
    return bytes(out)
