"""The delta folder format, the base model's identity, and loading a delta back into a model.

A delta folder holds:
- `delta.safetensors`: per compressed weight `<name>.<part>` tensors (see `codecs.py`):
  bitdelta `sign` + `scale`, lowrank `u` + `v`, dare `mask` + `values`, mixed `u<k>`, `v<k>` and
  their scales; exactly-stored tensors as `<name>.exact` (F - B) or `<name>.full` (F).
- `llmshrink_delta.json`: format version, the DeltaConfig, the base's identity (name as given,
  resolved path, revision, and a sha256 over its tensors), and per tensor its kind and shape.
- `config.json`: `model_type: llmshrink_delta`, the fine-tuned model's config under
  `finetuned_config` (see `hf.py`: plain transformers loads the folder after `import llmshrink`).
Tokenizer files are not copied: they come from the base.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from transformers import AutoConfig, AutoModelForCausalLM

from ..arch import checkpoint_names
from ..errors import UsageError
from ..models import resolve_model
from ..safetensors_io import TensorIndex, tensors_sha256
from .codecs import codec_of

__all__ = ["DELTA_FILE", "META_FILE", "FORMAT_VERSION", "is_delta_folder", "read_meta", "tensors_sha256",
           "locate_base", "read_delta", "apply_delta", "load_delta_model"]

logger = logging.getLogger(__name__)

DELTA_FILE = "delta.safetensors"
META_FILE = "llmshrink_delta.json"
FORMAT = "llmshrink-delta"
FORMAT_VERSION = 1


def is_delta_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / META_FILE).is_file()


def read_meta(folder: str | os.PathLike) -> dict:
    path = Path(folder) / META_FILE
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"{path} is not a readable delta description ({e}); re-create the delta") from None
    if meta.get("format") != FORMAT:
        raise UsageError(f"{path} is not an llmshrink delta (format {meta.get('format')!r})")
    if not isinstance(meta.get("version"), int) or meta["version"] > FORMAT_VERSION:
        raise UsageError(f"{path} is delta format version {meta.get('version')}, newer than this llmshrink "
                         f"reads ({FORMAT_VERSION}); upgrade llmshrink")
    return meta


def _candidates(meta: dict, base_model: str | os.PathLike | None) -> list[Path]:
    """Local folders that may hold the base, in order: `base_model`, or the recorded name, then
    the recorded path (a Hub id only from the local cache, at the recorded revision)."""
    recorded = meta["base"]
    tries = [str(base_model)] if base_model is not None else [recorded.get("name"), recorded.get("path")]
    found: list[Path] = []
    for name in [t for t in tries if t]:
        try:
            resolved = Path(resolve_model(name))
        except UsageError:
            continue
        if not resolved.is_dir():
            try:
                resolved = Path(snapshot_download(name, revision=recorded.get("revision"), local_files_only=True))
            except (OSError, ValueError) as e:  # not in the cache, or not a valid id
                logger.debug("base %s not in the Hub cache: %s", name, e)
                continue
        if resolved not in found:
            found.append(resolved)
    return found


def locate_base(meta: dict, base_model: str | os.PathLike | None = None) -> Path:
    """The base's local folder, checked by hash: the first candidate whose tensors hash to the
    recorded sha256. A clear error when none is found, or when those found have other hashes."""
    found = _candidates(meta, base_model)
    if not found:
        where = base_model if base_model is not None else f"{meta['base'].get('name')} (recorded path {meta['base'].get('path')})"
        raise UsageError(f"the delta's base model {where} cannot be found; pass base_model=/path/to/base "
                         "to from_pretrained, pointing at the base the delta was made from")
    for folder in found:
        if tensors_sha256(folder) == meta["base"]["sha256"]:
            return folder
    check_base(meta, found[0])  # raises, naming both hashes
    return found[0]


def read_delta(folder: str | os.PathLike) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """(meta, {weight name: {part: tensor}}) of a delta folder."""
    folder = Path(folder)
    meta = read_meta(folder)
    if not (folder / DELTA_FILE).is_file():
        raise UsageError(f"{folder} has no {DELTA_FILE}; the delta folder is incomplete, re-create it")
    index = TensorIndex.of_file(folder / DELTA_FILE)
    parts: dict[str, dict[str, torch.Tensor]] = {name: {} for name in meta["tensors"]}
    for key in index.keys():
        name, part = key.rsplit(".", 1)
        if name not in parts:
            raise UsageError(f"{folder / DELTA_FILE} holds {key}, which {META_FILE} does not list; re-create the delta")
        parts[name][part] = index.get(key)
    return meta, parts


def params_by_name(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer by name, tied ones under each of their names."""
    return {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers(remove_duplicate=False))}


def apply_delta(model: torch.nn.Module, meta: dict, parts: dict[str, dict[str, torch.Tensor]]) -> torch.nn.Module:
    """Add the decoded delta to the base model's weights, in place (fp32 arithmetic)."""
    params = params_by_name(model)
    names = checkpoint_names(model, list(meta["tensors"]))
    bits = tuple(meta["config"].get("mixed_bits", ()))
    with torch.no_grad():
        for key, info in meta["tensors"].items():
            param = params.get(names[key])
            if param is None or list(param.shape) != info["shape"]:
                raise UsageError(f"the delta's {key} {info['shape']} has no match in the base model; "
                                 "this delta was made for another architecture")
            if info["kind"] != "zero":  # a zero delta stores nothing
                param.copy_(codec_of(info["kind"]).apply(param, parts[key], tuple(info["shape"]), bits))
    return model


def read_config(folder: str | os.PathLike) -> dict:
    path = Path(folder) / "config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def check_base(meta: dict, base_folder: Path) -> None:
    """A clear error, naming both hashes, when the base found is not the one the delta was made from."""
    expected = meta["base"]["sha256"]
    found = tensors_sha256(base_folder)
    if found != expected:
        raise UsageError(f"base model {base_folder} has tensor sha256 {found[:16]}..., but the delta was made from "
                         f"{meta['base'].get('name')} with sha256 {expected[:16]}...; pass the right base with "
                         "base_model=/path/to/base")


def load_delta_model(folder: str | os.PathLike, base_model: str | os.PathLike | None = None,
                     dtype: torch.dtype = torch.float32, **kwargs):
    """Find the base, check its hash, apply the delta and return a normal transformers model."""
    meta, parts = read_delta(folder)
    base = locate_base(meta, base_model)
    # the fine-tune's own config (eos, generation settings, ...) over the base's weights
    finetuned = dict(read_config(folder).get("finetuned_config") or {})
    config = AutoConfig.for_model(finetuned.pop("model_type"), **finetuned) if finetuned else None
    model = AutoModelForCausalLM.from_pretrained(base, config=config, dtype=torch.float32, trust_remote_code=False,
                                                 **kwargs)
    apply_delta(model, meta, parts)
    model.name_or_path = str(folder)
    return model.to(dtype)
