"""Walk a model layer by layer: capture inputs, accumulate Hessians, quantize, save GPTQ tensors.

Only one decoder layer's weights are in memory at a time: the model is built empty (accelerate's
`init_empty_weights`), the embeddings and head are loaded, and each layer is loaded from the
safetensors files when its turn comes and emptied after. Finished layers and the next layer's
inputs are kept in `<out>.partial/` (`resume.py`), so a run that is interrupted resumes from the
last finished layer and writes the same checkpoint.

The pieces: `passes.py` runs the calibration forwards, `layers.py` quantizes a layer's linears
(the math is `algorithm.py`), `resume.py` keeps the .partial folder, `write.py` writes the folder.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections import Counter
from pathlib import Path

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM

from ..arch import arch_for, checkpoint_names, decoder_layers, layer_linears
from ..errors import Interrupted, UsageError
from ..io import prepare_out
from ..safetensors_io import TensorIndex, tensors_sha256
from .compat import vllm_limits, whole_group_size
from .config import GPTQConfig, dynamic_pattern
from .layers import head_of, quantize_head, quantize_layer
from .mixed import CANDIDATE_BITS, allocate, average_bits, check_budget, plan_rules, stored_bits
from .passes import BATCH, calib_dtype, capture_first_inputs
from .sensitivity import CRITERIA, layer_losses, output_fisher
from .resume import PartialRun, run_identity
from .write import FORMAT_FILES, checkpoint_key, quantization_config, stored_desc_act, write_checkpoint

__all__ = ["quantize_checkpoint", "FORMAT_FILES"]

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
    index = TensorIndex(source)
    _check_finite(index)
    model = _empty_model(source)
    if config.lm_head and head_of(model) is None:
        raise UsageError(f"{source} has no linear output head to quantize; leave lm_head off")
    spec = arch_for(model)
    layers = decoder_layers(model, spec)
    layer_prefix = spec.layers + "."
    key_of = {name: key for key, name in checkpoint_names(model, index.keys()).items()}
    _load_outside_layers(model, source, index, key_of, layer_prefix)
    _check_dynamic(config, model, layers, spec, layer_prefix)
    requested_group_size = config.group_size
    config = _whole_groups(config, model, layers, spec, layer_prefix)
    dtype = calib_dtype(config)
    calib_info = {**calib_info, "dtype": str(dtype).removeprefix("torch.")}
    mixed = None
    if config.target_bits is not None:
        config, mixed = _mixed_precision(source, config, model, layers, spec, layer_prefix, index, key_of, calib,
                                         dtype, calib_info, sensitivity, progress)
    vllm = _vllm_verdict(config, model, layers, spec, layer_prefix)
    run = PartialRun(out, run_identity(source, config, calib_info, calib))
    if run.done:
        logger.info("resuming after layer %d of %d", run.done, len(layers))
    needs_h = config.needs_activations
    inputs = capture_first_inputs(model, layers, calib, dtype) if needs_h else []  # plain RTN: no activations
    if run.done and needs_h:
        inputs = [(h, kw) for h, (_, kw) in zip(run.saved_inputs().split(BATCH), inputs)]

    tuple_output = run.tuple_output
    bar = tqdm(range(len(layers)), desc="quantize", unit="layer", disable=not progress, initial=run.done)
    try:
        for i in range(run.done, len(layers)):
            layer = layers[i]
            prefix = f"{layer_prefix}{i}."
            _load_into(layer, prefix, index, key_of)
            index.release()
            tensors, stats, outputs, tuple_output = quantize_layer(layer, prefix, spec, inputs, config, dtype)
            if needs_h:
                inputs = [(h, kw) for h, (_, kw) in zip(outputs, inputs)]
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
    extra = {}
    if mixed is not None:
        qc["llmshrink"]["mixed_precision"] = {k: mixed[k] for k in ("target_bits", "achieved_bits", "criterion")}
        extra[MIXED_FILE] = mixed
    write_checkpoint(out, source, model, tensors, qc, max_shard_bytes, extra)
    run.remove()
    return out


def _check_finite(index: TensorIndex) -> None:
    """Every floating tensor of the source is finite, checked before any work (one tensor at a time)."""
    for key in index.keys():
        if index.dtype_name(key) in ("F64", "F32", "F16", "BF16"):
            tensor = index.get(key)
            if not torch.isfinite(tensor).all():
                raise UsageError(f"{key} holds NaN or Inf values (in {index.folder}); the model cannot be "
                                 "quantized until they are fixed")
    index.release()


def _empty_model(folder: Path):
    """The model of `folder`'s config, its weights on the meta device, in eval mode."""
    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    if getattr(config, "quantization_config", None):
        method = config.quantization_config.get("quant_method", "?") if isinstance(config.quantization_config, dict) \
            else getattr(config.quantization_config, "quant_method", "?")
        raise UsageError(f"{folder} is already quantized ({method}); quantize the original full-precision model")
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def _load_into(module: torch.nn.Module, prefix: str, index: TensorIndex, key_of: dict[str, str],
               skip: str | None = None) -> None:
    """Load the tensors of `module` (model names `prefix` + name; `key_of` maps model names to
    checkpoint keys), except names under `skip`."""
    for name, _ in list(module.named_parameters()) + list(module.named_buffers()):
        if skip and name.startswith(skip):
            continue
        key = key_of.get(f"{prefix}{name}")
        if key is None:
            continue  # tied or non-persistent; handled by the caller
        tensor = index.get(key)
        set_module_tensor_to_device(module, name, "cpu", value=tensor.float() if tensor.is_floating_point() else tensor)


def _load_outside_layers(model, source: Path, index: TensorIndex, key_of: dict[str, str], layer_prefix: str) -> None:
    """Load what lies outside the decoder layers (embeddings, final norm, head), kept throughout,
    rounded to fp16 as it is saved so calibration sees the stored values."""
    _load_into(model, "", index, key_of, skip=layer_prefix)
    for name, p in model.named_parameters():
        if not name.startswith(layer_prefix) and p.device.type != "meta":
            p.data = p.data.to(torch.float16).float()
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta" and not n.startswith(layer_prefix)]
    if missing:
        raise UsageError(f"{source} lacks {missing[0]}; the checkpoint does not match its config")


def _quantized_linears(config: GPTQConfig, model, layers, spec, layer_prefix: str) -> dict[str, tuple]:
    """Per linear that `config` quantizes: (its config, in_features)."""
    found = {}
    for i, layer in enumerate(layers):
        for step in layer_linears(layer, spec):
            for name, module in step:
                mconf = config.for_module(f"{layer_prefix}{i}.{name}")
                if mconf is not None:
                    found[f"{layer_prefix}{i}.{name}"] = (mconf, module.in_features)
    head = head_of(model) if config.lm_head else None
    if head is not None and config.for_module(head[0]) is not None:
        found[head[0]] = (config.for_module(head[0]), head[1].in_features)
    return found


def _whole_groups(config: GPTQConfig, model, layers, spec, layer_prefix: str) -> GPTQConfig:
    """`config` with a group size that gives every linear whole groups (see GPTQConfig.group_size)."""
    if config.partial_groups:
        return config
    linears = _quantized_linears(config, model, layers, spec, layer_prefix)
    widths = [n for mconf, n in linears.values() if mconf.group_size == config.group_size]
    size = whole_group_size(config.group_size, widths)
    if size != config.group_size:
        odd = next(name for name, (m, n) in linears.items() if m.group_size == config.group_size and n % config.group_size)
        logger.info("group_size=%d leaves %s (%d inputs) a partial last group; using group_size=%d, which "
                    "divides every linear (partial_groups=True keeps %d)", config.group_size, odd,
                    linears[odd][1], size, config.group_size)
        config = dataclasses.replace(config, group_size=size)
    return config


def _vllm_verdict(config: GPTQConfig, model, layers, spec, layer_prefix: str) -> dict:
    """vLLM's verdict on the checkpoint `config` writes ({"gpu": why not or None, "cpu": ...}),
    said in one warning line before any work."""
    linears = _quantized_linears(config, model, layers, spec, layer_prefix)
    modules = {name: (m.bits, m.group_size, m.sym, n) for name, (m, n) in linears.items()}
    verdict = {backend: vllm_limits(modules, stored_desc_act(config), cpu=backend == "cpu") for backend in ("gpu", "cpu")}
    if verdict["gpu"]:
        logger.warning("vLLM will not serve this checkpoint: %s", verdict["gpu"])
    elif verdict["cpu"]:
        logger.warning("vLLM will serve this checkpoint on GPUs only: %s", verdict["cpu"])
    return verdict


def _all_linears(model, layers, spec, layer_prefix: str) -> dict[str, torch.nn.Linear]:
    """Every linear the walker visits (decoder layers' in step order, then the head), by model name."""
    found = {f"{layer_prefix}{i}.{name}": module for i, layer in enumerate(layers)
             for step in layer_linears(layer, spec) for name, module in step}
    head = head_of(model)
    if head is not None:
        found[head[0]] = head[1]
    return found


def _check_dynamic(config: GPTQConfig, model, layers, spec, layer_prefix: str) -> None:
    """Every `dynamic` rule matches some linear of the model (before any work)."""
    names = list(_all_linears(model, layers, spec, layer_prefix))
    for key in config.dynamic:
        if not any(re.fullmatch(dynamic_pattern(key), name) for name in names):
            raise UsageError(f"dynamic rule '{key}' matches no linear of this model (its linears are named like "
                             f"'{names[0]}'); fix the regex or drop the rule")


MIXED_FILE = "mixed_precision.json"
CRITERION = "fisher"  # which predicted loss the plan minimizes (bench/sensitivity.py measures both)


def _mixed_precision(source: Path, config: GPTQConfig, model, layers, spec, layer_prefix: str, index: TensorIndex,
                     key_of: dict, calib: torch.Tensor, dtype, calib_info: dict, sensitivity, progress: bool
                     ) -> tuple[GPTQConfig, dict]:
    """`config` with each decoder linear's bits chosen under `config.target_bits` (as `dynamic`
    rules), and the record saved as mixed_precision.json: the plan and the losses behind it."""
    linears = {name: (config.for_module(name), module) for name, module in _all_linears(model, layers, spec,
                                                                                        layer_prefix).items()
               if name.startswith(layer_prefix) and config.for_module(name) is not None}
    widths = {name: [b for b in CANDIDATE_BITS if not (m.in_features * b % 32 or m.out_features * b % 32)]
              for name, (_, m) in linears.items()}
    sizes = {name: {b: stored_bits(b, mconf.group_size, m.in_features, m.out_features) for b in widths[name]}
             for name, (mconf, m) in linears.items()}
    weights = {name: m.in_features * m.out_features for name, (_, m) in linears.items()}
    check_budget(config.target_bits, sum(min(s.values()) for s in sizes.values()) / sum(weights.values()),
                 config.group_size)
    source_sha = tensors_sha256(source)
    if sensitivity is not None:
        losses = _read_sensitivity(Path(sensitivity), source_sha, config, sizes)
    else:
        losses = _measure_sensitivity(source, config, model, layers, spec, layer_prefix, index, key_of, calib,
                                      dtype, list(linears), progress)
    options = {name: {b: (sizes[name][b], losses[name][b][CRITERION]) for b in widths[name]} for name in linears}
    plan = allocate(options, config.target_bits * sum(weights.values()))
    base, rules = plan_rules(plan)
    skips = {k: v for k, v in config.dynamic.items() if k.startswith("-:")}
    planned = dataclasses.replace(config, bits=base, target_bits=None, dynamic={**skips, **rules})  # the target: in the record
    achieved = round(average_bits(plan, options, weights), 4)
    logger.info("mixed precision: %.3f bits per weight (target %s), %s", achieved, config.target_bits,
                ", ".join(f"{n} linears at {b} bits" for b, n in sorted(Counter(plan.values()).items())))
    for i in range(len(layers)):
        row = {name[len(f"{layer_prefix}{i}."):]: b for name, b in plan.items() if name.startswith(f"{layer_prefix}{i}.")}
        logger.info("  layer %d: %s", i, " ".join(f"{n.rsplit('.', 1)[-1]}={b}" for n, b in row.items()))
    record = {"target_bits": config.target_bits, "achieved_bits": achieved, "criterion": CRITERION,
              "group_size": config.group_size, "candidates": list(CANDIDATE_BITS), "source_sha256": source_sha,
              "calibration": calib_info, "plan": plan,
              "losses": {name: {str(b): v for b, v in per.items()} for name, per in losses.items()}}
    return planned, record


def _measure_sensitivity(source: Path, config: GPTQConfig, model, layers, spec, layer_prefix: str,
                         index: TensorIndex, key_of: dict, calib: torch.Tensor, dtype, names: list[str],
                         progress: bool) -> dict:
    """Predicted losses of every linear in `names` at every candidate width (sensitivity.py): one
    backward pass of the full model for the Fisher, then one layer-by-layer walk, inputs unquantized."""
    fisher = output_fisher(source, calib, names)
    inputs = capture_first_inputs(model, layers, calib, dtype)
    losses: dict = {}
    for i in tqdm(range(len(layers)), desc="sensitivity", unit="layer", disable=not progress):
        prefix = f"{layer_prefix}{i}."
        _load_into(layers[i], prefix, index, key_of)
        index.release()
        found, outputs = layer_losses(layers[i], prefix, spec, inputs, config, CANDIDATE_BITS, fisher, dtype)
        losses.update(found)
        inputs = [(h, kw) for h, (_, kw) in zip(outputs, inputs)]
        layers[i].to("meta")
    return losses


def _read_sensitivity(path: Path, source_sha: str, config: GPTQConfig, sizes: dict) -> dict:
    """The losses of an earlier run's mixed_precision.json (a checkpoint folder or the file), if
    they were measured on this model at this group size for every linear to plan."""
    path = path / MIXED_FILE if path.is_dir() else path
    try:
        record = json.loads(path.read_text())
        losses = {name: {int(b): v for b, v in per.items()} for name, per in record["losses"].items()}
    except (OSError, ValueError, KeyError, AttributeError) as e:
        raise UsageError(f"cannot read the sensitivity file {path} ({e}); give a {MIXED_FILE} that a "
                         "target_bits run wrote") from None
    if record.get("source_sha256") != source_sha:
        raise UsageError(f"{path} was measured on another model (its tensors' sha256 differs); measure this one "
                         "by leaving the sensitivity file out")
    if record.get("group_size") != config.group_size:
        raise UsageError(f"{path} was measured at group size {record.get('group_size')}, not {config.group_size}; "
                         "use the same group size or leave the sensitivity file out")
    missing = [name for name in sizes if not set(sizes[name]) <= set(losses.get(name, {}))]
    if missing:
        raise UsageError(f"{path} has no losses for {missing[0]}; leave the sensitivity file out to measure them")
    return losses
