"""`llmshrink.AutoModelForCausalLM`: loads every llmshrink output, and anything transformers loads."""

from __future__ import annotations

import os

import torch

from .errors import UsageError

__all__ = ["AutoModelForCausalLM"]


class AutoModelForCausalLM:
    """`from_pretrained` for plain checkpoints (via transformers) and GPTQ checkpoints (via QuantLinear)."""

    @classmethod
    def from_pretrained(cls, name: str | os.PathLike, dtype: torch.dtype | str = torch.float32,
                        trust_remote_code: bool = False, **kwargs):
        from transformers import AutoConfig
        from transformers import AutoModelForCausalLM as HFAuto

        from .gptq.load import is_gptq_checkpoint, load_quantized
        from .models import DTYPES, resolve_model

        if trust_remote_code:
            raise UsageError("llmshrink never runs a model's remote code; load it with transformers yourself")
        dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
        resolved = resolve_model(name)
        try:
            config = AutoConfig.from_pretrained(resolved, trust_remote_code=False)
        except OSError as e:
            raise UsageError(f"cannot load model '{name}': {str(e).splitlines()[0]}") from None
        if is_gptq_checkpoint(config):
            if kwargs:
                raise UsageError(f"options {', '.join(kwargs)} are not supported for GPTQ checkpoints")
            return load_quantized(resolved, dtype=dtype)
        return HFAuto.from_pretrained(resolved, dtype=dtype, trust_remote_code=False, **kwargs)
