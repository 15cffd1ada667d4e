"""The format registry: what kind of folder this is, how to load it, where its tokenizer is, how to
describe it.

Every output format registers one `Format`, from the folder of the method that writes it
(gptq/format.py, delta/format.py, heal/format.py, pack/format.py); `dense`, a plain transformers
checkpoint, is here. `detect(folder)` asks the formats in `priority` order (a packed folder wraps
any other, so it is asked first; dense, the fallback, last). `llmshrink.AutoModelForCausalLM`, the
evaluation harness, the Hub card and the pipeline's order checks ask this registry and nothing else.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import AutoModelForCausalLM as HFAuto

from .errors import UsageError
from .io import folder_size
from .methods import load_builtin_methods

__all__ = ["FORMATS", "Format", "LoadRequest", "detect", "open_folder", "register_format",
           "tokenizer_folder", "weight_bytes"]


@dataclasses.dataclass
class LoadRequest:
    """What `from_pretrained` was asked, passed to a format's `load`."""

    name: str  # as the user gave it, for messages
    dtype: Any = None  # torch dtype, or None for the format's default
    base_model: str | None = None  # delta/adapter: where the base lives (default: the recorded one)
    token: str | bool | None = None
    kwargs: dict = dataclasses.field(default_factory=dict)  # passed to transformers for dense folders
    load: Callable[..., Any] | None = None  # llmshrink.AutoModelForCausalLM.from_pretrained, to load a base


def _weight_files_bytes(folder: Path) -> int:
    return folder_size(folder, suffixes=(".safetensors", ".bin"))


@dataclasses.dataclass(frozen=True)
class Format:
    name: str  # the kind methods declare as input and output: dense, quantized, adapter, delta, packed, ...
    detect: Callable[[Path], bool]
    load: Callable[[Path, LoadRequest], Any]
    priority: int = 50  # lower is asked first
    unwrap: Callable[[Path], Path] | None = None  # a wrapper (packed): the plain folder it stands for
    tokenizer_folder: Callable[[Path], str] = str
    describe: Callable[[Path], tuple[str, list[str]]] = lambda folder: ("transformers", [])  # (library, tags)
    weight_bytes: Callable[[Path], int] = _weight_files_bytes  # what the model needs on disk (an adapter: + its base)
    transformers_loads: bool = True  # plain transformers (after `import llmshrink`) loads it from the folder
    card_lines: Callable[[Path, str], list[str]] | None = None  # extra "How to load" lines of the model card
    final: bool = False  # no pipeline step may follow it
    # what the pipeline says of a step that cannot take this kind as input ({name}: the step,
    # {before}: the step that made it, {method}: the step's method)
    refusal: str = "{name} cannot follow {before}; put {method} before it"


FORMATS: dict[str, Format] = {}


def register_format(fmt: Format) -> Format:
    if fmt.name in FORMATS and FORMATS[fmt.name] is not fmt:
        raise ValueError(f"format '{fmt.name}' is already registered")
    FORMATS[fmt.name] = fmt
    return fmt


def detect(folder: str | os.PathLike, skip: tuple[str, ...] = ()) -> Format:
    """The format of a local model folder (`skip`: formats not to consider, e.g. the wrapper itself)."""
    load_builtin_methods()  # each method folder registers its formats
    folder = Path(folder)
    for fmt in sorted(FORMATS.values(), key=lambda f: f.priority):
        if fmt.name not in skip and fmt.detect(folder):
            return fmt
    raise UsageError(f"{folder} has no config.json; give a folder saved with save_pretrained, a Hub id, "
                     "or a packaged model name")


def open_folder(folder: str | os.PathLike) -> tuple[Path, Format]:
    """(the plain folder, its format): wrappers such as packed folders are unwrapped first."""
    folder = Path(folder)
    fmt = detect(folder)
    while fmt.unwrap is not None:
        folder = fmt.unwrap(folder)
        fmt = detect(folder)
    return folder, fmt


def tokenizer_folder(folder: str | os.PathLike) -> str:
    """Where a local model folder's tokenizer lives (a delta's comes from its base, a packed
    folder's from its decoded copy)."""
    plain, fmt = open_folder(folder)
    return fmt.tokenizer_folder(plain)


def weight_bytes(folder: str | os.PathLike) -> int:
    """Bytes of the weight files a model folder needs, as stored (packed or not)."""
    folder = Path(folder)
    return detect(folder).weight_bytes(folder)


def _load_dense(folder: Path, request: LoadRequest):
    if request.base_model is not None:
        raise UsageError(f"base_model= is for delta and adapter folders; {request.name} is neither")
    try:
        return HFAuto.from_pretrained(str(folder), dtype=request.dtype or torch.float32, trust_remote_code=False,
                                      **request.kwargs)
    except OSError as e:
        raise UsageError(f"cannot load model '{request.name}': {str(e).splitlines()[0]}") from None


register_format(Format(
    name="dense", priority=100, detect=lambda folder: (folder / "config.json").is_file(), load=_load_dense,
    refusal="{name} cannot follow {before}; put {method} before it"))
