"""The GPTQ checkpoint format: a standard GPTQ folder (`quantization_config.quant_method: gptq`)
loads into QuantLinear modules; its card offers `vllm serve` where llmshrink judged vLLM can, and
names the readers of a checkpoint whose input embedding is quantized, or whose linears are low-rank
factors (only llmshrink's)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from transformers import AutoConfig

from ..errors import UsageError
from ..formats import Format, LoadRequest, register_format
from .load import default_load_dtype, load_quantized, log_load_dtype, read_quantization_config as quantization_config

__all__ = ["GPTQ_FORMAT", "quantization_config"]


def _config_json(folder: Path) -> dict:
    try:
        return json.loads((Path(folder) / "config.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}


def _detect(folder: Path) -> bool:
    return quantization_config(folder).get("quant_method") == "gptq"


def _load(folder: Path, request: LoadRequest):
    if request.base_model is not None:
        raise UsageError(f"base_model= is for delta and adapter folders; {request.name} is neither")
    if request.kwargs:
        raise UsageError(f"options {', '.join(request.kwargs)} are not supported for GPTQ checkpoints")
    dtype = request.dtype
    if dtype is None:
        dtype, why = default_load_dtype(AutoConfig.from_pretrained(folder, trust_remote_code=False), "cpu")
        log_load_dtype(dtype, "cpu", why)
    return load_quantized(folder, dtype=dtype)


def _describe(folder: Path) -> tuple[str, list[str]]:
    qc = quantization_config(folder)
    return "transformers", ["gptq", f"{qc['bits']}-bit"] + (["low-rank"] if _factors(qc.get("llmshrink", {})) else [])


def _factors(record: dict) -> dict:
    """Factorized linear -> stored rank, for a GPTQ checkpoint of a factorized model (else empty)."""
    return (record.get("factorized") or {}).get("ranks") or {}


def _card_lines(folder: Path, repo_id: str) -> list[str]:
    record = quantization_config(folder).get("llmshrink", {})
    return _width_lines(folder, record) + _reader_lines(record, repo_id)


def _width_lines(folder: Path, record: dict) -> list[str]:
    """What the card says of a mixed-precision plan and of a rotation before quantizing."""
    lines = []
    mixed = record.get("mixed_precision")
    if mixed:
        widths = Counter(m["bits"] for name, m in (record.get("modules") or {}).items() if not m.get("embedding"))
        lines += ["", f"Mixed precision: {mixed['achieved_bits']:.3f} bits per weight on average over the decoder "
                  f"linears (scales, zeros and g_idx counted; target {mixed['target_bits']}): "
                  + ", ".join(f"{n} linears at {b} bits" for b, n in sorted(widths.items()))
                  + ". The plan is the standard `dynamic` field; `mixed_precision.json` has it with the measured losses."]
    rotate = _config_json(folder).get("llmshrink_rotate")
    if rotate:
        lines += ["", f"Quantized after a {rotate['config']['kind']} rotation folded into the weights (an ordinary "
                  "model of the same architecture" + (", its head untied from the embedding" if rotate.get("untied") else "")
                  + ")."]
    return lines


def _reader_lines(record: dict, repo_id: str) -> list[str]:
    """Which tools read the checkpoint."""
    if _factors(record):
        return ["", f"It is a GPTQ checkpoint of a factorized model: {len(_factors(record))} linears are stored as "
                "two quantized low-rank factors each (`<name>.V`, `<name>.U`). llmshrink "
                "(`llmshrink.AutoModelForCausalLM.from_pretrained`) and transformers after `import llmshrink` load "
                "it; GPTQModel and vLLM do not read low-rank factors."]
    embedding = next(((name, m) for name, m in (record.get("modules") or {}).items() if m.get("embedding")), None)
    if embedding is not None:
        return _quantized_embedding_lines(*embedding)
    if record.get("vllm_servable", True):  # llmshrink's own verdict, where it wrote one
        lines = ["", "It is a standard GPTQ checkpoint: transformers (with gptqmodel) and vLLM read it "
                 "without llmshrink:", "", "```bash", f"vllm serve {repo_id}", "```"]
        if not record.get("vllm_cpu_servable", True):
            lines += ["", f"On GPUs: vLLM's CPU backend does not serve it ({record['vllm_limit']})."]
        return lines
    return ["", "It is a standard GPTQ checkpoint that transformers (with gptqmodel) and GPTQModel read; "
            f"vLLM does not serve it ({record.get('vllm_limit', 'see quantization_config')})."]


def _quantized_embedding_lines(name: str, record: dict) -> list[str]:
    """Who reads a checkpoint whose input embedding llmshrink quantized (`embed_bits`)."""
    head = f"; the output head `{record['tied_head']}` shares it" if record.get("tied_head") else ""
    return ["", f"It is a GPTQ checkpoint whose input embedding `{name}` is quantized too ({record['bits']}-bit, group "
            f"size {record['group_size']}, stored as GPTQ tensors{head}). llmshrink "
            "(`llmshrink.AutoModelForCausalLM.from_pretrained`) and transformers after `import llmshrink` load it; "
            "GPTQModel and vLLM do not read a quantized input embedding."]


GPTQ_FORMAT = register_format(Format(
    name="quantized", priority=40, detect=_detect, load=_load, describe=_describe, card_lines=_card_lines,
    refusal="{name} cannot follow {before}: it needs full-precision weights and the model is quantized from "
            "there on; put {method} before {before}"))
