"""QLoRA on the CPU: the bitsandbytes NF4 base, its width rule and its eval-mode trap.

- The frozen base loads in NF4 (`bnb_config`, fp32 compute). bitsandbytes' CPU NF4 path needs
  every quantized linear's output width to divide by 32 (`check_qlora_widths` fails before loading).
- The trap on CPUs with AVX512-BF16: a forward of a `Linear4bit` in eval mode without grad
  repacks its weight into a CPU inference layout whose matmul has no autograd formula, so every
  later backward through it is silently wrong (`packed_for_cpu` names such modules). Evaluation
  runs with the whole model in eval mode except the `Linear4bit` modules (`eval_mode`), whose
  training flag only gates that repack.

bitsandbytes is imported on first use only: it is slow to import and only QLoRA needs it.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from accelerate import init_empty_weights
from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

from ..errors import UsageError

__all__ = ["QLORA_MULTIPLE", "bnb_config", "check_qlora_widths", "eval_mode", "packed_for_cpu"]

QLORA_MULTIPLE = 32  # bitsandbytes' CPU NF4 path needs output widths divisible by 32


def bnb_config() -> BitsAndBytesConfig:
    """NF4 weights, fp32 compute."""
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)


def check_qlora_widths(resolved: str) -> None:
    """Fail before loading if a linear that NF4 would quantize has an output width not divisible by 32."""
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(resolved))
    head = model.get_output_embeddings()
    bad = [f"{name} ({m.out_features})" for name, m in model.named_modules()
           if isinstance(m, torch.nn.Linear) and m is not head and m.out_features % QLORA_MULTIPLE]
    if bad:
        raise UsageError(f"qlora on the CPU needs every quantized linear's output width divisible by "
                         f"{QLORA_MULTIPLE}; {resolved} has {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}; "
                         "use --method lora")


def _linear4bit_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    from bitsandbytes.nn import Linear4bit  # lazy: slow to import, QLoRA only

    return [m for m in model.modules() if isinstance(m, Linear4bit)]


def packed_for_cpu(model: torch.nn.Module) -> list[str]:
    """Names of Linear4bit modules whose weight bitsandbytes repacked for CPU inference (breaks backward)."""
    from bitsandbytes.nn import Linear4bit  # lazy: slow to import, QLoRA only

    return [n for n, m in model.named_modules() if isinstance(m, Linear4bit)
            and getattr(m.weight.quant_state, "packing_format_for_cpu", False)]


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Eval mode (no dropout) for an evaluation forward, but Linear4bit modules stay in training
    mode so bitsandbytes never repacks their weights; the previous mode is restored after."""
    was_training = model.training
    model.eval()
    for m in _linear4bit_modules(model):
        m.training = True  # gates only bitsandbytes' CPU inference repack; Linear4bit has no dropout
    try:
        yield model
    finally:
        model.train(was_training)
