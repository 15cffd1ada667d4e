"""Read a checkpoint's safetensors tensors one at a time, and write shards atomically."""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import UsageError

__all__ = ["StoredTensor", "TensorIndex", "check_safetensors_file", "save_shards", "save_tensors", "tensors_sha256"]


def check_safetensors_file(path: str | os.PathLike) -> None:
    """Read only the header of a safetensors file and check that the file holds every byte it
    describes; a truncated or corrupt file is a one-line UsageError before any tensor is read."""
    path = Path(path)
    size = path.stat().st_size
    why = None
    try:
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0] if size >= 8 else None
            if n is None or n > size - 8:
                why = f"its header claims {n} bytes of a {size}-byte file" if n is not None else "it is shorter than a header"
            else:
                header = json.loads(f.read(n))
                end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
                if 8 + n + end > size:
                    why = f"it has {size} bytes, its header describes {8 + n + end}"
    except (ValueError, KeyError, TypeError, IndexError, struct.error) as e:
        why = f"its header is not valid ({type(e).__name__})"
    if why:
        raise UsageError(f"{path} is not a readable safetensors file ({why}); it may be truncated or corrupt: "
                         "re-download or re-save it")


class TensorIndex:
    """Every tensor of a model folder (single file or sharded with an index), loaded on demand."""

    def __init__(self, folder: str | os.PathLike, files: list[str] | None = None):
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if files is None and index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif files is None and (self.folder / "model.safetensors").is_file():
            files = ["model.safetensors"]
        elif files is None:
            raise UsageError(f"{self.folder} has no model.safetensors; llmshrink reads safetensors only "
                             "(re-save the model with save_pretrained(safe_serialization=True))")
        self._handles = {}
        self.file_of: dict[str, str] = {}
        for name in files:
            handle = self._open(name)
            for key in handle.keys():
                self.file_of[key] = name

    def _open(self, name: str):
        if name not in self._handles:
            try:
                self._handles[name] = safe_open(str(self.folder / name), framework="pt")
            except (SafetensorError, OSError) as e:
                raise UsageError(f"{self.folder / name} is not a readable safetensors file ({e}); "
                                 "it may be truncated or corrupt: re-download or re-save it") from None
        return self._handles[name]

    def __contains__(self, key: str) -> bool:
        return key in self.file_of

    def keys(self) -> list[str]:
        return list(self.file_of)

    def release(self) -> None:
        """Unmap the files (reopened on the next read). Pages read through the memory map count
        in the process's RSS until then, so a walker that reads one layer at a time calls this
        after each layer to keep its footprint to one layer."""
        self._handles.clear()

    @classmethod
    def of_file(cls, path: str | os.PathLike) -> "TensorIndex":
        """The tensors of one safetensors file."""
        return cls(Path(path).parent, files=[Path(path).name])

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._open(self.file_of[key]).get_slice(key).get_shape())

    def dtype_name(self, key: str) -> str:
        """The safetensors dtype string ("F16", "I32", ...) of `key`, without reading the tensor."""
        return self._open(self.file_of[key]).get_slice(key).get_dtype()

    def get(self, key: str) -> torch.Tensor:
        try:
            return self._open(self.file_of[key]).get_tensor(key)
        except SafetensorError as e:
            raise UsageError(f"cannot read tensor {key} from {self.folder / self.file_of[key]} ({e}); "
                             "the file may be truncated or corrupt") from None


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """save_file to a temp name, then rename: a crash never leaves a half file at `path`."""
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


class StoredTensor(NamedTuple):
    """A tensor left in a safetensors file until it is written elsewhere (see `save_shards`)."""

    index: "TensorIndex"
    key: str


_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.int64: "I64", torch.int32: "I32",
           torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}
_ITEMSIZE = {name: dtype.itemsize for dtype, name in _DTYPES.items()}


def _info(t: torch.Tensor | StoredTensor) -> tuple[str, list[int], int]:
    """(safetensors dtype, shape, bytes) without loading a StoredTensor."""
    if isinstance(t, StoredTensor):
        dtype, shape = t.index.dtype_name(t.key), list(t.index.shape(t.key))
    else:
        dtype, shape = _DTYPES.get(t.dtype), list(t.shape)
    if dtype not in _ITEMSIZE:
        raise ValueError(f"dtype {dtype or t.dtype} cannot be written by llmshrink's safetensors writer")
    return dtype, shape, _ITEMSIZE[dtype] * math.prod(shape)


def _write_streaming(entries: dict[str, torch.Tensor | StoredTensor], path: Path, metadata: dict[str, str]) -> None:
    """Write a safetensors file one tensor at a time (safetensors' own writer needs every tensor in
    memory at once). The layout is the published one: an 8-byte little-endian header length, a
    JSON header padded with spaces to 8 bytes, then each tensor's bytes in header order."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for key in sorted(entries):
        dtype, shape, size = _info(entries[key])
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for key in sorted(entries):
            t = entries[key]
            t = t.index.get(t.key) if isinstance(t, StoredTensor) else t
            f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    os.replace(tmp, path)


def save_shards(tensors: dict[str, torch.Tensor | StoredTensor], folder: Path, max_shard_bytes: int = 2 * 2**30) -> None:
    """Write `model.safetensors`, or `model-0000k-of-0000n.safetensors` + index when over one shard.

    Values may be StoredTensor references, read one at a time while writing, so saving needs
    memory for one tensor, not the model."""
    shards: list[dict] = [{}]
    sizes = {key: _info(t)[2] for key, t in tensors.items()}
    size = 0
    for key in sorted(tensors):
        if shards[-1] and size + sizes[key] > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensors[key]
        size += sizes[key]
    if len(shards) == 1:
        _write_streaming(shards[0], folder / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _write_streaming(shard, folder / name, metadata={"format": "pt"})
        weight_map.update({key: name for key in shard})
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}, indent=2) + "\n")


def tensors_sha256(folder: str | os.PathLike) -> str:
    """sha256 over a checkpoint's tensors (name, dtype, shape, bytes, in name order): the same for
    a model however it is sharded, different for any change to any value."""
    index = TensorIndex(folder)
    h = hashlib.sha256()
    for key in sorted(index.keys()):
        t = index.get(key)
        h.update(f"{key}\0{index.dtype_name(key)}\0{list(t.shape)}\0".encode())
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    index.release()
    return h.hexdigest()
