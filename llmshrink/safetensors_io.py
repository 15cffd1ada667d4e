"""Read a checkpoint's safetensors tensors one at a time, and write shards atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import UsageError

__all__ = ["TensorIndex", "save_shards", "save_tensors"]


class TensorIndex:
    """Every tensor of a model folder (single file or sharded with an index), loaded on demand."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.folder / "model.safetensors").is_file():
            weight_map = None
        else:
            raise UsageError(f"{self.folder} has no model.safetensors; llmshrink reads safetensors only "
                             "(re-save the model with save_pretrained(safe_serialization=True))")
        self._handles = {}
        files = sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]
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


def save_shards(tensors: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int = 2 * 2**30) -> None:
    """Write `model.safetensors`, or `model-0000k-of-0000n.safetensors` + index when over one shard."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(tensors):
        nbytes = tensors[key].numel() * tensors[key].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensors[key]
        size += nbytes
    if len(shards) == 1:
        save_tensors(shards[0], folder / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_tensors(shard, folder / name, metadata={"format": "pt"})
        for key, t in shard.items():
            weight_map[key] = name
            total += t.numel() * t.element_size()
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
