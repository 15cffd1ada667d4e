"""`llmshrink.AutoModelForCausalLM`, `load_model` and `load_tokenizer`: load every llmshrink
output, and anything transformers loads.

The folder's format (llmshrink.formats) decides how: a packed folder is decoded first (into the
cache, once), a delta folder is applied to its base, an adapter is put on its base (loaded through
this same function, so a GPTQ base works), a GPTQ checkpoint loads into QuantLinear modules, and
anything else goes to transformers."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from huggingface_hub.errors import (HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                    RevisionNotFoundError)
from transformers import AutoTokenizer

from .errors import UsageError
from .formats import LoadRequest, open_folder, tokenizer_folder
from .hub import push_to_hub
from .models import DTYPES, PACKAGED_MODELS, check_model_folder, resolve_model

__all__ = ["AutoModelForCausalLM", "load_model", "load_tokenizer", "local_folder"]


_NOT_LOADED = ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.gguf", "*.onnx", "*.h5", "*.msgpack", "*.ot"]  # never read


def local_folder(name: str | os.PathLike | None, revision: str | None = None, token: str | bool | None = None) -> str:
    """The local folder of a packaged name, folder or Hub id: a Hub id's snapshot at `revision`
    (downloaded, or from the cache when offline); folders as they are."""
    resolved = resolve_model(name)
    if Path(resolved).is_dir():
        if revision is not None:
            raise UsageError(f"revision={revision!r} is for Hub ids; '{resolved}' is a local folder: drop revision=")
        return resolved
    try:
        folder = snapshot_download(resolved, revision=revision, token=token, ignore_patterns=_NOT_LOADED)
        check_model_folder(folder)
        return folder
    except RepositoryNotFoundError:
        raise UsageError(f"model '{resolved}' is not on the Hub (or is private: log in with `hf auth login`)") from None
    except RevisionNotFoundError:
        raise UsageError(f"model '{resolved}' has no revision {revision!r}: use a branch, tag or commit id it has") from None
    except LocalEntryNotFoundError:
        raise UsageError(f"model '{resolved}' is not in the local Hugging Face cache and the Hub cannot be reached "
                         "(offline: HF_HUB_OFFLINE=1, or no network); download it where the Hub is reachable or "
                         "pass a local folder") from None
    except HfHubHTTPError as e:
        raise UsageError(f"cannot download '{resolved}': {str(e).splitlines()[0]}") from None


class AutoModelForCausalLM:
    """`from_pretrained` for plain, GPTQ, adapter, delta and packed llmshrink outputs."""

    @classmethod
    def from_pretrained(cls, name: str | os.PathLike, dtype: torch.dtype | str | None = None,
                        trust_remote_code: bool = False, base_model: str | os.PathLike | None = None,
                        revision: str | None = None, token: str | bool | None = None, **kwargs):
        """Args:
            name: packaged name, folder or Hub id.
            dtype: torch dtype or its name; None or "auto": for a GPTQ checkpoint the fast and
                finite one for the device (`llmshrink.gptq.load.default_load_dtype`: never float16
                on CPU), float32 for everything else.
            base_model: for a delta or adapter folder, where its base lives (default: the recorded name/path).
            revision: branch, tag or commit of a Hub id (default: main).
            token: Hub token for a Hub id and its base (default: HF_TOKEN or the saved login).
            kwargs: passed to transformers for plain checkpoints.
        """
        if trust_remote_code:
            raise UsageError("llmshrink never runs a model's remote code; load it with transformers yourself")
        dtype = None if dtype in (None, "auto") else DTYPES[dtype] if isinstance(dtype, str) else dtype
        resolved = local_folder(name, revision, token)
        folder, fmt = open_folder(resolved)
        request = LoadRequest(name=str(name), dtype=dtype, base_model=None if base_model is None else str(base_model),
                              token=token, kwargs=kwargs, load=cls.from_pretrained)
        model = fmt.load(folder, request)
        model.llmshrink_source = resolved  # what push_to_hub uploads: the files as loaded, format kept
        model.push_to_hub = functools.partial(push_to_hub, model)
        return model


def _offline_hint(name: str, error: OSError) -> str:
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    hint = ("it is not in the local Hugging Face cache and the Hub is offline (HF_HUB_OFFLINE=1); "
            "download it on a connected machine or pass a local folder") if offline else str(error).splitlines()[0]
    return f"cannot load model '{name}': {hint}; packaged names: {', '.join(PACKAGED_MODELS)}"


def _tokenizer_of(resolved: str):
    folder = tokenizer_folder(resolved) if Path(resolved).is_dir() else resolved
    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except OSError as e:
        raise UsageError(_offline_hint(resolved, e)) from None


def load_tokenizer(name: str | None = None):
    """Load the tokenizer of a model given as alias, folder or Hub id."""
    return _tokenizer_of(resolve_model(name))


def load_model(name: str | None = None, dtype: str = "float32", device: str = "cpu"):
    """Load a causal LM and its tokenizer, in eval mode.

    Args:
        name: alias, folder or Hub id (see `resolve_model`).
        dtype: float32, bfloat16 or float16.
        device: torch device string.
    Returns:
        (model, tokenizer, resolved) where resolved is the folder or Hub id that was loaded.
    """
    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype '{dtype}'; use one of float32, bfloat16, float16")
    resolved = resolve_model(name)
    tokenizer = _tokenizer_of(resolved)
    try:
        model = AutoModelForCausalLM.from_pretrained(resolved, dtype=DTYPES[dtype])
    except OSError as e:
        raise UsageError(_offline_hint(resolved, e)) from None
    model.to(device).eval()
    return model, tokenizer, resolved
