"""`DeltaModel`: one base model in memory, many fine-tunes served from their compressed deltas.

The active delta is one per model and switches per call (`generate(..., delta=name)`, `use`,
`set_active`): requests for different fine-tunes take turns; switching is not thread-safe.

Linear and embedding weights that carry a delta are wrapped (never copied): a wrapped linear
computes `base(x) + x @ delta.T` from the compact delta (bitdelta: `scale * (x @ sign.T)` through
the 1-bit kernel), a wrapped embedding adds the delta's rows for the looked-up ids. Small tensors
(norms, biases) are swapped in place when the active delta changes; the base values are kept.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from ..arch import checkpoint_names
from ..errors import UsageError
from ..models import resolve_model
from ..safetensors_io import TensorIndex
from .codecs import DeltaCodec, codec_of
from .load import check_base, params_by_name, read_delta, tensors_sha256

__all__ = ["DeltaModel"]


Entry = tuple[DeltaCodec, tuple[int, ...], dict[str, torch.Tensor]]  # (codec, shape, parts)


class _Delta:
    """One loaded delta: per checkpoint tensor name, its codec, shape and parts, on the model's device,
    in the codec's serving form (`full` tensors become exact deltas against the base's original
    values; `mixed` bands are dequantized once into low-rank factors)."""

    def __init__(self, meta: dict, parts: dict[str, dict[str, torch.Tensor]], original: dict[str, torch.Tensor]):
        self.bits = tuple(meta["config"].get("mixed_bits", ()))
        self.entries: dict[str, Entry] = {}
        for key, info in meta["tensors"].items():
            if info["kind"] == "zero":  # a zero delta stores nothing
                continue
            shape = tuple(info["shape"])
            codec, p = codec_of(info["kind"]).serving_form(parts[key], shape, self.bits, original[key])
            self.entries[key] = (codec, shape, {k: t.to(original[key].device) for k, t in p.items()})


class _DeltaLinear(nn.Module):
    def __init__(self, base: nn.Linear, key: str, owner: "DeltaModel"):
        super().__init__()
        self.base, self.key, self._owner = base, key, [owner]  # a list keeps owner out of the module tree

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        entry = self._owner[0]._entry(self.key)
        if entry is None:
            return y
        codec, shape, parts = entry
        return y + codec.matmul(x, parts, shape, self._owner[0]._bits()).to(y.dtype)


class _DeltaEmbedding(nn.Module):
    def __init__(self, base: nn.Embedding, key: str, owner: "DeltaModel"):
        super().__init__()
        self.base, self.key, self._owner = base, key, [owner]

    @property
    def weight(self) -> torch.Tensor:  # transformers reads embed_tokens.weight (dtype, tying)
        return self.base.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        y = self.base(ids)
        entry = self._owner[0]._entry(self.key)
        if entry is None:
            return y
        codec, shape, parts = entry
        return y + codec.rows(ids, parts, shape, self._owner[0]._bits()).to(y.dtype)


class DeltaModel(nn.Module):
    """A base model plus named deltas; `use(name)` / `set_active(name)` picks the fine-tune served.

    Args:
        base: packaged name or local folder of the base the deltas were made from.
        dtype, device: of the base model.
    """

    def __init__(self, base: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str = "cpu"):
        super().__init__()
        self.base_folder = Path(resolve_model(base))
        if not self.base_folder.is_dir():
            raise UsageError(f"DeltaModel needs the base as a local folder or packaged name, got '{base}'")
        self.model = AutoModelForCausalLM.from_pretrained(self.base_folder, dtype=dtype).to(device).eval()
        self.deltas: dict[str, _Delta] = {}
        self.active: str | None = None
        self._small: dict[str, torch.Tensor] = {}  # pristine base values of tensors swapped in place
        self._wrapped: set[str] = set()
        # checkpoint name -> tensor, taken before any module is wrapped (wrapping renames them)
        own = params_by_name(self.model)
        keys = TensorIndex(self.base_folder).keys()
        self._params = {key: own[name] for key, name in checkpoint_names(self.model, keys).items() if name in own}

    # ---- managing deltas --------------------------------------------------------------------
    def add(self, name: str, folder: str | os.PathLike) -> None:
        """Load a delta folder under `name` (its base hash must match this base)."""
        meta, parts = read_delta(folder)
        if not hasattr(self, "_base_hash"):
            self._base_hash = tensors_sha256(self.base_folder)
        if meta["base"]["sha256"] != self._base_hash:
            check_base(meta, self.base_folder)  # raises, naming both hashes
        missing = [key for key in meta["tensors"] if key not in self._params]
        if missing:
            raise UsageError(f"the delta's {missing[0]} has no match in the base model; it was made for another architecture")
        for key, info in meta["tensors"].items():
            if info["kind"] != "zero":
                self._wrap(key, self._params[key])
        # originals: swapped small tensors may hold the active delta's values right now
        original = {key: self._small.get(key, self._params[key]) for key in meta["tensors"]}
        self.deltas[name] = _Delta(meta, parts, original)
        self.set_active(self.active)  # re-adding the active name takes effect now

    def _wrap(self, key: str, param: torch.Tensor) -> None:
        """Wrap every module using `param` as its weight (tied heads too), or mark it for swapping."""
        if key in self._wrapped or key in self._small:
            return
        owners = [(n, m) for n, m in self.model.named_modules(remove_duplicate=False)
                  if isinstance(m, (nn.Linear, nn.Embedding)) and m.weight is param]
        if not owners:
            self._small[key] = param.detach().clone()
            return
        for name, module in owners:
            parent_name, _, child = name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            wrapper = _DeltaLinear if isinstance(module, nn.Linear) else _DeltaEmbedding
            setattr(parent, child, wrapper(module, key, self))
        self._wrapped.add(key)

    def set_active(self, name: str | None) -> None:
        """Serve fine-tune `name` from now on (None: the base)."""
        if name is not None and name not in self.deltas:
            raise UsageError(f"no delta named '{name}'; loaded: {', '.join(self.deltas) or 'none'}")
        self.active = name
        with torch.no_grad():
            for key, pristine in self._small.items():
                target = self._params[key]
                target.copy_(pristine)
                entry = self._entry(key)
                if entry is not None:
                    codec, shape, parts = entry
                    target.copy_(codec.apply(pristine, parts, shape, self._bits()))

    @contextlib.contextmanager
    def use(self, name: str | None) -> Iterator["DeltaModel"]:
        """`with dm.use("math"): dm.generate(...)`: serve `name` inside the block."""
        previous = self.active
        self.set_active(name)
        try:
            yield self
        finally:
            self.set_active(previous)

    def _entry(self, key: str) -> Entry | None:
        return None if self.active is None else self.deltas[self.active].entries.get(key)

    def _bits(self) -> tuple[int, ...]:
        return self.deltas[self.active].bits

    # ---- running ----------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def generate(self, *args, delta: str | None = ..., **kwargs):
        """`model.generate`; `delta=` serves that fine-tune for this call only."""
        if delta is ...:
            return self.model.generate(*args, **kwargs)
        with self.use(delta):
            return self.model.generate(*args, **kwargs)
