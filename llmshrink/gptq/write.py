"""Write the GPTQ checkpoint folder: tensors under the source's key names, `config.json` with the
standard `quantization_config` (our own record under its "llmshrink" key), `quantize_config.json`,
the generation config and the tokenizer files, renamed into place when complete."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..io import atomic_dir, copy_tokenizer_files
from ..safetensors_io import save_shards
from .config import GPTQConfig

__all__ = ["FORMAT_FILES", "checkpoint_key", "quantization_config", "stored_desc_act", "write_checkpoint"]

FORMAT_FILES = ("config.json", "quantize_config.json")


def stored_desc_act(config: GPTQConfig) -> bool:
    """The layout's desc_act: act-order with static groups stores g_idx = i // group_size, which
    readers must be told is no reordering (vLLM refuses desc_act=True checkpoints)."""
    return config.act_order and not config.static_groups


def quantization_config(config: GPTQConfig, calib_info: dict, stats: dict, requested_group_size: int,
                        vllm: dict) -> dict:
    """The checkpoint's `quantization_config`: the standard GPTQ fields, then ours under "llmshrink".

    Args:
        config: the config used (its group size the one stored).
        calib_info: how the calibration windows were made.
        stats: per quantized module, {"bits", "loss"}.
        requested_group_size: the group size asked for.
        vllm: vLLM's verdict per backend ({"gpu": why not or None, "cpu": ...}).
    """
    qc = {
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
        "bits": config.bits,
        "group_size": config.group_size,
        "desc_act": stored_desc_act(config),  # the act-order used is recorded under "llmshrink" below
        "sym": config.sym,
        "damp_percent": config.damp_percent,
        "true_sequential": config.true_sequential,
        "static_groups": config.static_groups,
        "lm_head": config.lm_head,
    }
    if config.dynamic:
        qc["dynamic"] = config.to_gptq_dynamic()
    qc["llmshrink"] = {"config": config.to_dict(), "act_order": config.act_order,
                       "group_size_requested": requested_group_size, "vllm_servable": vllm["gpu"] is None,
                       "vllm_cpu_servable": vllm["cpu"] is None, "calibration": calib_info, "modules": stats}
    if vllm["gpu"] or vllm["cpu"]:
        qc["llmshrink"]["vllm_limit"] = vllm["gpu"] or vllm["cpu"]
    return qc


def checkpoint_key(name: str, key_of: dict[str, str]) -> str:
    """The source checkpoint's spelling of model tensor `name` (new tensors such as `x.qweight`
    follow their module's `x.weight`), so the output keeps the source's key names."""
    if name in key_of:
        return key_of[name]
    module, _, suffix = name.rpartition(".")
    weight_key = key_of.get(f"{module}.weight")
    return weight_key[: -len("weight")] + suffix if weight_key else name


def write_checkpoint(out: Path, source: Path, model, tensors: dict, qc: dict, max_shard_bytes: int,
                     extra: dict[str, dict] | None = None) -> None:
    """Write the checkpoint of `model` (its config; the weights are `tensors`, by checkpoint key,
    tensors or `StoredTensor`s read one at a time) with quantization config `qc` at `out`, and
    `extra` JSON files by name."""
    model.config.quantization_config = qc
    model.config.dtype = torch.float16
    source_config = json.loads((source / "config.json").read_text())
    # Where the source computes in bf16, float16 may overflow: loads on CUDA read this (see load.py).
    qc["llmshrink"]["source_dtype"] = source_config.get("dtype", source_config.get("torch_dtype"))
    with atomic_dir(out) as tmp:
        save_shards(tensors, tmp, max_shard_bytes)
        model.config.save_pretrained(tmp)
        (tmp / "quantize_config.json").write_text(json.dumps(qc, indent=2) + "\n")
        for name, content in (extra or {}).items():
            (tmp / name).write_text(json.dumps(content, indent=1) + "\n")
        if model.generation_config is not None:
            model.generation_config.save_pretrained(tmp)
        copy_tokenizer_files(source, tmp)
