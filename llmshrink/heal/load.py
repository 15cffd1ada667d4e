"""What heal trains on: the student (plain, NF4 or a GPTQ checkpoint's packed modules), its
tokenizer, the teacher it distils from and the LoRA config over the student's linears."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ..errors import UsageError
from ..factorize.format import QUANT_METHOD as FACTORIZED, load_factorized
from ..gptq.load import load_quantized, quant_method
from .adapters import lora_config
from .config import HealConfig
from .qlora import bnb_config, check_qlora_widths

__all__ = ["FACTORIZED", "heal_lora_config", "load_student", "load_teacher", "load_tokenizer", "quantization"]


def quantization(resolved: str) -> str | None:
    """The quant_method of a checkpoint's quantization_config ("gptq", ...), or None."""
    return quant_method(AutoConfig.from_pretrained(resolved))


def load_student(resolved: str, method: str) -> torch.nn.Module:
    """The model to train, in fp32 compute: plain (lora), NF4 (qlora) or a GPTQ checkpoint's
    QuantLinear modules, kept packed (lora on a quantized base)."""
    quantized = quantization(resolved)
    if quantized == "gptq" and method == "lora":
        return load_quantized(resolved, dtype=torch.float32)
    if quantized == FACTORIZED and method in ("lora", "full"):  # its factors are ordinary linears
        return load_factorized(resolved, dtype=torch.float32)
    if quantized is not None:
        fix = "use --method lora, which trains on its quantized weights" if quantized in ("gptq", FACTORIZED) else \
            "heal the unquantized model (--method qlora quantizes it itself)"
        raise UsageError(f"{resolved} is a {quantized} checkpoint, which --method {method} cannot train; {fix}")
    if method == "qlora":
        check_qlora_widths(resolved)
        return AutoModelForCausalLM.from_pretrained(resolved, dtype=torch.float32, quantization_config=bnb_config())
    return AutoModelForCausalLM.from_pretrained(resolved, dtype=torch.float32)


def load_tokenizer(resolved: str) -> PreTrainedTokenizerBase:
    """The tokenizer saved with `resolved`; UsageError if there is none."""
    try:
        return AutoTokenizer.from_pretrained(resolved)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot load the tokenizer of {resolved} ({str(e).splitlines()[0]}); "
                         "heal needs a folder saved with its tokenizer") from None


def _check_teacher(student, student_tok, teacher, teacher_tok, model: str, teacher_name: str) -> None:
    """UsageError unless the teacher predicts over the student's vocabulary with the same tokenizer."""
    sv, tv = student.config.vocab_size, teacher.config.vocab_size
    if sv != tv:
        raise UsageError(f"teacher {teacher_name} has vocab_size={tv} but {model} has {sv}; distillation needs "
                         "the same tokenizer: give the model the pruned one came from")
    if student_tok.get_vocab() != teacher_tok.get_vocab():
        raise UsageError(f"teacher {teacher_name} has a different tokenizer vocabulary from {model}; "
                         "distillation needs the same tokenizer: give the model the pruned one came from")


def load_teacher(teacher_resolved: str, student: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
                 resolved: str, device: torch.device) -> PreTrainedModel:
    """The frozen fp32 teacher on `device`, in eval mode, checked to share the student's tokenizer."""
    teacher = AutoModelForCausalLM.from_pretrained(teacher_resolved, dtype=torch.float32).eval()
    teacher.requires_grad_(False)
    _check_teacher(student, tokenizer, teacher, load_tokenizer(teacher_resolved), resolved, teacher_resolved)
    return teacher.to(device)


def heal_lora_config(model: torch.nn.Module, config: HealConfig):
    """The peft LoraConfig of `config` over `model` (comma-separated target_modules split)."""
    targets = config.target_modules if config.target_modules == "all-linear" else \
        [t.strip() for t in config.target_modules.split(",") if t.strip()]
    return lora_config(model, config.rank, config.lora_alpha, config.lora_dropout, targets)
