"""`llmshrink.AutoModelForCausalLM`: loads every llmshrink output, and anything transformers loads.

Packed folders (`llmshrink pack`) are decoded first (into the cache, once); then a delta folder is
applied to its base, an adapter folder (`llmshrink heal`) is put on its base (loaded through this
same function, so a GPTQ base works), a GPTQ checkpoint loads into QuantLinear modules, and
anything else goes to transformers."""

from __future__ import annotations

import os

import torch

from .errors import UsageError

__all__ = ["AutoModelForCausalLM"]


class AutoModelForCausalLM:
    """`from_pretrained` for plain, GPTQ, delta and packed llmshrink outputs."""

    @classmethod
    def from_pretrained(cls, name: str | os.PathLike, dtype: torch.dtype | str = torch.float32,
                        trust_remote_code: bool = False, base_model: str | os.PathLike | None = None, **kwargs):
        """Args:
            name: packaged name, folder or Hub id.
            dtype: torch dtype or its name.
            base_model: for a delta or adapter folder, where its base lives (default: the recorded name/path).
            kwargs: passed to transformers for plain checkpoints.
        """
        from transformers import AutoConfig
        from transformers import AutoModelForCausalLM as HFAuto

        from .adapters import adapter_base, is_adapter_folder, load_adapter
        from .delta.load import is_delta_folder, load_delta_model
        from .gptq.load import is_gptq_checkpoint, load_quantized
        from .models import DTYPES, resolve_model
        from .pack import is_packed_folder, materialize

        if trust_remote_code:
            raise UsageError("llmshrink never runs a model's remote code; load it with transformers yourself")
        dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
        resolved = resolve_model(name)
        if is_packed_folder(resolved):
            resolved = str(materialize(resolved))
        if is_delta_folder(resolved):
            return load_delta_model(resolved, base_model=base_model, dtype=dtype, **kwargs)
        if is_adapter_folder(resolved):
            base = base_model or adapter_base(resolved)
            if not base:
                raise UsageError(f"the adapter in {name} does not record its base model; pass base_model=")
            base_resolved = resolve_model(base)
            return load_adapter(cls.from_pretrained(base_resolved, dtype=dtype, **kwargs), resolved, base_resolved,
                                check_base=base_model is None)
        if base_model is not None:
            raise UsageError(f"base_model= is for delta and adapter folders; {name} is neither")
        try:
            config = AutoConfig.from_pretrained(resolved, trust_remote_code=False)
        except OSError as e:
            raise UsageError(f"cannot load model '{name}': {str(e).splitlines()[0]}") from None
        if is_gptq_checkpoint(config):
            if kwargs:
                raise UsageError(f"options {', '.join(kwargs)} are not supported for GPTQ checkpoints")
            return load_quantized(resolved, dtype=dtype)
        return HFAuto.from_pretrained(resolved, dtype=dtype, trust_remote_code=False, **kwargs)
