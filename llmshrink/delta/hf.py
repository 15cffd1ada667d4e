"""Plain `transformers.AutoModelForCausalLM.from_pretrained(DELTA_DIR)` after `import llmshrink`.

A delta folder's config.json has `model_type: "llmshrink_delta"` (the fine-tune's own config rides
along under `finetuned_config`). `import llmshrink` registers that model type with transformers'
public `AutoConfig.register` / `AutoModelForCausalLM.register`; the registered class is a loader
whose `from_pretrained` finds the base, checks its hash, applies the delta and returns the
ordinary transformers model. Without llmshrink, transformers reports an unknown model type
`llmshrink_delta`, which names what is missing.
"""

from __future__ import annotations

import os

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedConfig

from ..models import DTYPES
from .load import load_delta_model

__all__ = ["LlmshrinkDeltaConfig", "LlmshrinkDeltaLoader", "MODEL_TYPE", "register_with_transformers"]

MODEL_TYPE = "llmshrink_delta"


class LlmshrinkDeltaConfig(PreTrainedConfig):
    """config.json of a delta folder: the fine-tune's config and the base's name."""

    model_type = MODEL_TYPE

    def __init__(self, finetuned_config: dict | None = None, base_model: str | None = None, **kwargs):
        self.finetuned_config = finetuned_config or {}
        self.base_model = base_model
        super().__init__(**kwargs)


class LlmshrinkDeltaLoader:
    """Registered for LlmshrinkDeltaConfig; `from_pretrained` returns the fine-tuned transformers model."""

    config_class = LlmshrinkDeltaConfig

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *args, base_model: str | os.PathLike | None = None,
                        dtype: torch.dtype | str | None = None, torch_dtype=None, device_map=None, **kwargs):
        """transformers passes its hub and loader options along; a delta loads from local files
        only, so those are ignored. `dtype` (default and "auto": fp32, the delta's arithmetic) and
        `device_map` apply to the returned model."""
        dtype = dtype if dtype is not None else torch_dtype
        if isinstance(dtype, str):
            dtype = DTYPES.get(dtype, torch.float32)
        extra = {"device_map": device_map} if device_map is not None else {}
        return load_delta_model(path, base_model=base_model, dtype=dtype or torch.float32, **extra)


def register_with_transformers() -> None:
    AutoConfig.register(MODEL_TYPE, LlmshrinkDeltaConfig, exist_ok=True)
    AutoModelForCausalLM.register(LlmshrinkDeltaConfig, LlmshrinkDeltaLoader, exist_ok=True)
