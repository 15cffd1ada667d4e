"""`llmshrink.AutoModelForCausalLM`: loads every llmshrink output, and anything transformers loads.

Packed folders (`llmshrink pack`) are decoded first (into the cache, once); then a delta folder is
applied to its base, an adapter folder (`llmshrink heal`) is put on its base (loaded through this
same function, so a GPTQ base works), a GPTQ checkpoint loads into QuantLinear modules, and
anything else goes to transformers."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

from .errors import UsageError
from .hub import push_to_hub

__all__ = ["AutoModelForCausalLM"]


_NOT_LOADED = ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.gguf", "*.onnx", "*.h5", "*.msgpack", "*.ot"]  # never read


def _local_folder(resolved: str, revision: str | None = None, token: str | bool | None = None) -> str:
    """A Hub id's snapshot folder at `revision` (downloaded, or from the cache when offline); folders
    as they are."""
    if Path(resolved).is_dir():
        if revision is not None:
            raise UsageError(f"revision={revision!r} is for Hub ids; '{resolved}' is a local folder: drop revision=")
        return resolved
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    from .models import check_model_folder

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
    """`from_pretrained` for plain, GPTQ, delta and packed llmshrink outputs."""

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
        from .models import DTYPES, resolve_model

        if trust_remote_code:
            raise UsageError("llmshrink never runs a model's remote code; load it with transformers yourself")
        dtype = None if dtype in (None, "auto") else DTYPES[dtype] if isinstance(dtype, str) else dtype
        resolved = _local_folder(resolve_model(name), revision, token)
        model = cls._load(resolved, name, dtype, base_model, token, **kwargs)
        model.llmshrink_source = resolved  # what push_to_hub uploads: the files as loaded, format kept
        model.push_to_hub = functools.partial(push_to_hub, model)
        return model

    @classmethod
    def _load(cls, resolved: str, name, dtype: torch.dtype | None, base_model, token, **kwargs):
        from transformers import AutoConfig
        from transformers import AutoModelForCausalLM as HFAuto

        from .heal.adapters import adapter_base, is_adapter_folder, load_adapter
        from .delta.load import is_delta_folder, load_delta_model
        from .gptq.load import default_load_dtype, is_gptq_checkpoint, load_quantized, log_load_dtype
        from .models import resolve_model
        from .pack import is_packed_folder, materialize

        if is_packed_folder(resolved):
            resolved = str(materialize(resolved))
        if is_delta_folder(resolved):
            return load_delta_model(resolved, base_model=base_model, dtype=dtype or torch.float32, **kwargs)
        if is_adapter_folder(resolved):
            base = base_model or adapter_base(resolved)
            if not base:
                raise UsageError(f"the adapter in {name} does not record its base model; pass base_model=")
            base_resolved = resolve_model(base)
            # float32 unless asked: the default dtype rule is for GPTQ checkpoints loaded as they are
            base_loaded = cls.from_pretrained(base_resolved, dtype=dtype or torch.float32, token=token, **kwargs)
            return load_adapter(base_loaded, resolved, base_resolved, check_base=base_model is None)
        if base_model is not None:
            raise UsageError(f"base_model= is for delta and adapter folders; {name} is neither")
        try:
            config = AutoConfig.from_pretrained(resolved, trust_remote_code=False)
        except OSError as e:
            raise UsageError(f"cannot load model '{name}': {str(e).splitlines()[0]}") from None
        if is_gptq_checkpoint(config):
            if kwargs:
                raise UsageError(f"options {', '.join(kwargs)} are not supported for GPTQ checkpoints")
            if dtype is None:
                dtype, why = default_load_dtype(config, "cpu")
                log_load_dtype(dtype, "cpu", why)
            return load_quantized(resolved, dtype=dtype)
        return HFAuto.from_pretrained(resolved, dtype=dtype or torch.float32, trust_remote_code=False, **kwargs)
