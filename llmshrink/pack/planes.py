"""One chunk of elements as byte planes, and back; and the rotation each tensor is split with.

Byte planes (ZipNN-style, generalized): an element is read as a little-endian uint of `width`
bytes and rotated left by `rot` bits, `r = (u << rot) | (u >> (8 * width - rot))`; plane k is
byte k of every r ([n] uint8). rot = 1 puts the float sign bit at the bottom, so the top byte of
a bf16 is its exponent alone (ZipNN's split). The encoder picks `rot` per tensor from 0-4 by
coding samples: rot = 3 wins on bf16 LLM weights, because the top exponent bits are nearly
constant and move into the low plane, which Huffman coding then shrinks, while the top plane
takes the biased leading mantissa bits. 1-byte types (bool, u8, i8, fp8) and unknown dtypes
are plain bytes.
"""

from __future__ import annotations

import os

import numpy as np

from .pieces import compressor

__all__ = ["UINT", "ROTATIONS", "to_planes", "from_planes", "choose_rotation"]

ROTATIONS = range(5)  # candidate `rot` for elements wider than a byte
_SAMPLES, _SAMPLE = 4, 1 << 14  # the rotation is chosen on 4 spread samples of 16K elements
UINT = {1: np.dtype("u1"), 2: np.dtype("<u2"), 4: np.dtype("<u4"), 8: np.dtype("<u8")}


def to_planes(data: bytes, width: int, rot: int) -> list[np.ndarray]:
    """[n * width] bytes of little-endian elements -> `width` planes of [n] uint8, rotated by `rot`."""
    if width == 1:
        return [np.frombuffer(data, np.uint8)]
    u = np.frombuffer(data, UINT[width])  # [n] little-endian uint
    if rot:
        u = (u << rot) | (u >> (8 * width - rot))
    return [(u >> (8 * k)).astype(np.uint8) for k in range(width)]


def from_planes(planes: np.ndarray, rot: int, u: np.ndarray, t: np.ndarray) -> None:
    """Inverse of `to_planes`: [width, n] uint8 planes into `u` ([n] uint), `t` (same) as scratch."""
    top = len(planes) - 1
    np.left_shift(planes[top], 8 * top, out=u, dtype=u.dtype)  # no separate widening copy of a plane
    for k in range(1, top):
        np.left_shift(planes[k], 8 * k, out=t, dtype=u.dtype)
        u |= t
    np.bitwise_or(u, planes[0], out=u)  # plane 0 is widened on the fly
    if rot:  # rotate right by `rot`
        np.right_shift(u, rot, out=t)
        u <<= 8 * u.itemsize - rot
        u |= t


def choose_rotation(fd: int, start: int, length: int, width: int) -> int:
    """The rotation whose planes Huffman-code smallest on a few samples spread over the tensor
    stored in bytes [start, start + length) of the file `fd`, elements of `width` bytes."""
    n = length // width
    take = min(n, _SAMPLE)
    starts = sorted({(n - take) * i // (_SAMPLES - 1) for i in range(_SAMPLES)})
    samples = [os.pread(fd, take * width, start + s * width) for s in starts]

    def cost(rot: int) -> int:
        return sum(min(len(compressor(0).compress(p)), p.nbytes)
                   for s in samples for p in to_planes(s, width, rot))

    return min(ROTATIONS, key=cost)
