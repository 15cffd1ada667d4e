"""Walk a model layer by layer: capture inputs, accumulate Hessians, quantize, save GPTQ tensors.

Only one decoder layer's weights are in memory at a time: the model is built empty (accelerate's
`init_empty_weights`), the embeddings and head are loaded, and each layer is loaded from the
safetensors files when its turn comes and emptied after. Finished layers and the next layer's
inputs are kept in `<out>.partial/` (`resume.py`), so a run that is interrupted resumes from the
last finished layer and writes the same checkpoint.

The pieces: `source.py` reads the source model, `passes.py` runs the calibration forwards,
`layers.py` quantizes a layer's linears (the math is `algorithm.py`), `plan.py` plans the widths
of `target_bits`, `resume.py` keeps the .partial folder, `write.py` writes the folder.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..arch import arch_for, checkpoint_names, decoder_layers, layer_linears
from ..errors import Interrupted, UsageError
from ..factorize.modules import factorized_modules, padded_rank
from ..io import prepare_out
from ..safetensors_io import TensorIndex
from .compat import vllm_limits, whole_group_size
from .config import GPTQConfig, dynamic_pattern
from .embedding import check_embedding, quantize_embedding
from .layers import fp_forward, head_of, quantize_head, quantize_layer
from .passes import BATCH, calib_dtype, capture_first_inputs
from .plan import MIXED_FILE, plan_mixed_precision
from .resume import PartialRun, run_identity
from .source import (all_linears, check_factorized_source, check_finite, empty_model, factor_multiple, load_into,
                     load_outside_layers, pad_factors)
from .write import FORMAT_FILES, checkpoint_key, quantization_config, stored_desc_act, write_checkpoint

__all__ = ["FORMAT_FILES", "MIXED_FILE", "quantize_checkpoint"]

logger = logging.getLogger(__name__)


def quantize_checkpoint(source: str | os.PathLike, config: GPTQConfig, calib: torch.Tensor, out: str | os.PathLike,
                        calib_info: dict | None = None, overwrite: bool = False, progress: bool = True,
                        max_shard_bytes: int = 2 * 2**30, sensitivity: str | os.PathLike | None = None) -> Path:
    """Quantize the model saved in folder `source` into a GPTQ checkpoint at `out`.

    Args:
        source: a transformers folder with safetensors weights.
        config: how to quantize.
        calib: [nsamples, seqlen] calibration token ids.
        out: the checkpoint folder to write (renamed into place when complete).
        calib_info: how `calib` was made, recorded in the checkpoint.
        overwrite: replace an existing non-empty `out`.
        max_shard_bytes: larger checkpoints are split into shards with an index.
        sensitivity: with `config.target_bits`, the mixed_precision.json of an earlier run on the same
            model and group size, whose measured losses are reused (any budget from one pass).
    Returns:
        The checkpoint folder.
    """
    source, out = Path(source), Path(out)
    calib_info = calib_info or {}
    prepare_out(out, overwrite)
    check_factorized_source(source, config)
    index = TensorIndex(source)
    check_finite(index)
    model = empty_model(source, index)
    factors = {name: padded_rank(m.rank, factor_multiple(config, name))
               for name, m in factorized_modules(model).items()}  # name -> rank as stored (padded to pack)
    if config.lm_head and head_of(model) is None:
        raise UsageError(f"{source} has no linear output head to quantize; leave lm_head off")
    check_embedding(model, config)
    spec = arch_for(model)
    layers = decoder_layers(model, spec)
    layer_prefix = spec.layers + "."
    key_of = {name: key for key, name in checkpoint_names(model, index.keys()).items()}
    load_outside_layers(model, source, index, key_of, layer_prefix)
    _check_dynamic(config, model, layers, spec, layer_prefix)
    requested_group_size = config.group_size
    config = _whole_groups(config, model, layers, spec, layer_prefix, factors)
    dtype = calib_dtype(config)
    calib_info = {**calib_info, "dtype": str(dtype).removeprefix("torch.")}
    mixed = None
    if config.target_bits is not None:
        config, mixed = plan_mixed_precision(source, config, model, layers, spec, layer_prefix, index, key_of, calib,
                                         dtype, calib_info, sensitivity, progress)
    vllm = _vllm_verdict(config, model, layers, spec, layer_prefix, factors)
    run = PartialRun(out, run_identity(source, config, calib_info, calib))
    if run.done:
        logger.info("resuming after layer %d of %d", run.done, len(layers))
    needs_h = config.needs_activations
    inputs = capture_first_inputs(model, layers, calib, dtype) if needs_h else []  # plain RTN: no activations
    # config.fp_target: the full-precision model's hidden states run alongside (the same at the first layer)
    fp_inputs = list(inputs) if config.fp_target and needs_h else None
    if run.done and fp_inputs is not None:  # resumed: the full-precision layers before it run again
        for i in range(run.done):
            load_into(layers[i], f"{layer_prefix}{i}.", index, key_of)
            layers[i].to(dtype)
            fp_inputs = [(h, kw) for h, (_, kw) in zip(fp_forward(layers[i], [], fp_inputs)[1], fp_inputs)]
            layers[i].to("meta")
    if run.done and needs_h:
        inputs = [(h, kw) for h, (_, kw) in zip(run.saved_inputs().split(BATCH), inputs)]

    tuple_output = run.tuple_output
    bar = tqdm(range(len(layers)), desc="quantize", unit="layer", disable=not progress, initial=run.done)
    try:
        for i in range(run.done, len(layers)):
            layer = layers[i]
            prefix = f"{layer_prefix}{i}."
            load_into(layer, prefix, index, key_of)
            index.release()
            pad_factors(layer, prefix, config)
            tensors, stats, outputs, tuple_output, fp_outputs = quantize_layer(layer, prefix, spec, inputs, config,
                                                                               dtype, fp_inputs)
            if needs_h:
                inputs = [(h, kw) for h, (_, kw) in zip(outputs, inputs)]
            if fp_inputs is not None:
                fp_inputs = [(h, kw) for h, (_, kw) in zip(fp_outputs, fp_inputs)]
            run.save_layer(i, {prefix + k: v for k, v in tensors.items()}, stats, outputs if needs_h else None,
                           tuple_output)
            layer.to("meta")  # free the layer's weights
            bar.update(1)
    except UsageError:
        run.remove(ignore_errors=True)  # the input is at fault: never resume from this run
        raise
    except KeyboardInterrupt:
        raise Interrupted(f"the finished layers are kept in {run.folder}: run the same command again to resume, "
                          "or delete that folder to discard them") from None
    bar.close()

    all_stats: dict = {}
    head_tensors: dict[str, torch.Tensor] = {}
    if config.lm_head and config.for_module(head_of(model)[0]) is not None:
        head_tensors, head_stats = quantize_head(model, layers, inputs, config, tuple_output)
        all_stats.update(head_stats)
        model.config.tie_word_embeddings = False  # the embeddings stay as they were
    if config.embed_bits is not None:  # its `.weight` is then left out below, as a quantized head's is
        embed_tensors, embed_stats = quantize_embedding(model, layers, inputs, config, tuple_output)
        head_tensors.update(embed_tensors)
        all_stats.update(embed_stats)
    tensors: dict = {}
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        if not name.startswith(layer_prefix) and name in key_of and name.rsplit(".", 1)[0] + ".qweight" not in head_tensors:
            tensors[name] = p.data.to(torch.float16) if p.is_floating_point() else p.data
    tensors.update(head_tensors)
    for i in range(len(layers)):  # left on disk until written: saving holds one tensor at a time
        tensors.update(run.layer_tensors(i))
        all_stats.update(run.layer_stats(i))
    tensors = {checkpoint_key(name, key_of): t for name, t in tensors.items()}
    qc = quantization_config(config, calib_info, all_stats, requested_group_size, vllm)
    if factors:
        qc["llmshrink"]["factorized"] = {"ranks": factors}
    extra = {}
    if mixed is not None:
        qc["llmshrink"]["mixed_precision"] = {k: mixed[k] for k in ("target_bits", "achieved_bits", "criterion")}
        extra[MIXED_FILE] = mixed
    write_checkpoint(out, source, model, tensors, qc, max_shard_bytes, extra)
    run.remove()
    return out


def _quantized_linears(config: GPTQConfig, model, layers, spec, layer_prefix: str) -> dict[str, tuple]:
    """Per linear that `config` quantizes: (its config, in_features)."""
    head = head_of(model)
    skipped = head[0] if head is not None and not config.lm_head else None
    return {name: (config.for_module(name), module.in_features)
            for name, module in all_linears(model, layers, spec, layer_prefix).items()
            if name != skipped and config.for_module(name) is not None}


def _whole_groups(config: GPTQConfig, model, layers, spec, layer_prefix: str, factors: dict) -> GPTQConfig:
    """`config` with a group size that gives every linear whole groups (see GPTQConfig.group_size).
    The U factors of factorized linears (their inputs as wide as their rank) may keep a partial
    last group: only llmshrink reads such a checkpoint, and its loader reads partial groups."""
    if config.partial_groups:
        return config
    linears = _quantized_linears(config, model, layers, spec, layer_prefix)
    linears = {name: v for name, v in linears.items() if name.removesuffix(".U") not in factors}
    widths = [n for mconf, n in linears.values() if mconf.group_size == config.group_size]
    size = whole_group_size(config.group_size, widths)
    if size != config.group_size:
        odd = next(name for name, (m, n) in linears.items() if m.group_size == config.group_size and n % config.group_size)
        logger.info("group_size=%d leaves %s (%d inputs) a partial last group; using group_size=%d, which "
                    "divides every linear (partial_groups=True keeps %d)", config.group_size, odd,
                    linears[odd][1], size, config.group_size)
        config = dataclasses.replace(config, group_size=size)
    return config


def _vllm_verdict(config: GPTQConfig, model, layers, spec, layer_prefix: str, factors: dict) -> dict:
    """vLLM's verdict on the checkpoint `config` writes ({"gpu": why not or None, "cpu": ...}),
    said in one warning line before any work."""
    linears = _quantized_linears(config, model, layers, spec, layer_prefix)
    modules = {name: (m.bits, m.group_size, m.sym, n) for name, (m, n) in linears.items()}
    verdict = {backend: vllm_limits(modules, stored_desc_act(config), cpu=backend == "cpu", embed_bits=config.embed_bits)
               for backend in ("gpu", "cpu")}
    if factors:
        verdict = dict.fromkeys(verdict, "its linears are stored as two quantized low-rank factors each, which vLLM and "
                                "GPTQModel do not read (llmshrink does); quantize a merged model (factorize --merge) "
                                "for them")
    if verdict["gpu"]:
        logger.warning("vLLM will not serve this checkpoint: %s", verdict["gpu"])
    elif verdict["cpu"]:
        logger.warning("vLLM will serve this checkpoint on GPUs only: %s", verdict["cpu"])
    return verdict


def _check_dynamic(config: GPTQConfig, model, layers, spec, layer_prefix: str) -> None:
    """Every `dynamic` rule matches some linear of the model (before any work)."""
    names = list(all_linears(model, layers, spec, layer_prefix))
    for key in config.dynamic:
        if not any(re.fullmatch(dynamic_pattern(key), name) for name in names):
            raise UsageError(f"dynamic rule '{key}' matches no linear of this model (its linears are named like "
                             f"'{names[0]}'); fix the regex or drop the rule")


