"""Walk a model layer by layer: capture inputs, accumulate Hessians, quantize, save GPTQ tensors.

Only one decoder layer's weights are in memory at a time: the model is built empty (accelerate's
`init_empty_weights`), the embeddings and head are loaded, and each layer is loaded from the
safetensors files when its turn comes and emptied after. Finished layers and the next layer's
inputs are kept in `<out>.partial/`, so a run that is interrupted resumes from the last finished
layer and writes the same checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from safetensors.torch import load_file
from tqdm.auto import tqdm

from ..arch import arch_for, checkpoint_names, decoder_layers, layer_linears
from ..errors import UsageError
from ..io import atomic_dir
from ..safetensors_io import StoredTensor, TensorIndex, save_shards, save_tensors
from .algorithm import DEFAULT_SHRINK_GRID, accumulate_hessian, gptq_quantize, rtn_quantize
from .config import GPTQConfig
from .packing import pack_gptq

__all__ = ["quantize_checkpoint", "FORMAT_FILES"]

logger = logging.getLogger(__name__)

FORMAT_FILES = ("config.json", "quantize_config.json")
_BATCH = 8  # calibration windows per layer forward


class _Stop(Exception):
    """Raised from a hook once the inputs it needed are captured."""


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
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise UsageError(f"{key} holds NaN or Inf values; the model cannot be quantized until they are fixed")
        set_module_tensor_to_device(module, name, "cpu", value=tensor.float() if tensor.is_floating_point() else tensor)


def _checkpoint_key(name: str, key_of: dict[str, str]) -> str:
    """The source checkpoint's spelling of model tensor `name` (new tensors such as `x.qweight`
    follow their module's `x.weight`), so the output keeps the source's key names."""
    if name in key_of:
        return key_of[name]
    module, _, suffix = name.rpartition(".")
    weight_key = key_of.get(f"{module}.weight")
    return weight_key[: -len("weight")] + suffix if weight_key else name


def _empty_model(folder: Path):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    if getattr(config, "quantization_config", None):
        method = config.quantization_config.get("quant_method", "?") if isinstance(config.quantization_config, dict) \
            else getattr(config.quantization_config, "quant_method", "?")
        raise UsageError(f"{folder} is already quantized ({method}); quantize the original full-precision model")
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def _capture_first_inputs(model, layers, calib: torch.Tensor) -> list[tuple[torch.Tensor, dict]]:
    """Hidden states and keyword arguments reaching the first decoder layer, per batch."""
    captured: list[tuple[torch.Tensor, dict]] = []

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "use_cache")}
        captured.append((hidden, kwargs))
        raise _Stop

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in calib.split(_BATCH):
                try:
                    model(input_ids=batch, use_cache=False)
                except _Stop:
                    pass
    finally:
        handle.remove()
    return captured


def _run_layer(layer, inputs: list[tuple[torch.Tensor, dict]]) -> list[torch.Tensor]:
    outs = []
    with torch.no_grad():
        for hidden, kwargs in inputs:
            out = layer(hidden, **kwargs)
            outs.append(out[0] if isinstance(out, tuple) else out)
    return outs


def _step_hessian(layer, module, inputs) -> torch.Tensor:
    """Hessian of the inputs reaching `module`, stopping each forward as soon as they are seen."""
    state = {"H": None, "n": 0}

    def hook(mod, args):
        state["H"], state["n"] = accumulate_hessian(state["H"], state["n"], args[0])
        raise _Stop

    handle = module.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            for hidden, kwargs in inputs:
                try:
                    layer(hidden, **kwargs)
                except _Stop:
                    pass
    finally:
        handle.remove()
    return state["H"]


def _quantize_weight(weight: torch.Tensor, H, config: GPTQConfig):
    grid = DEFAULT_SHRINK_GRID if config.clip_search else (1.0,)
    if config.method == "rtn":
        return rtn_quantize(weight, config.bits, config.group_size, config.sym, grid,
                            None if H is None else torch.diag(H))
    return gptq_quantize(weight, H, config.bits, config.group_size, sym=config.sym,
                         desc_act=config.desc_act, static_groups=config.static_groups,
                         damp_percent=config.damp_percent, shrink_grid=grid)


def _needs_hessian(config: GPTQConfig) -> bool:
    return not (config.method == "rtn" and not config.clip_search)


def _quantize_layer(layer, prefix: str, spec, inputs, config: GPTQConfig) -> tuple[dict, dict]:
    """Quantize one loaded layer in place (weights replaced by their dequantized values).

    Linears of one step share an input, so they share one Hessian. With `true_sequential` each
    step's Hessian is taken after the steps before it were quantized; otherwise all come from the
    unquantized layer. Returns (tensors to save under `prefix`, per-module stats)."""
    steps = layer_linears(layer, spec)
    needs_h = _needs_hessian(config)
    hessians = {} if config.true_sequential or not needs_h else {i: _step_hessian(layer, step[0][1], inputs)
                                                                  for i, step in enumerate(steps)}
    tensors, stats = {}, {}
    for i, step in enumerate(steps):
        todo = [(name, mod, config.for_module(prefix + name)) for name, mod in step]
        todo = [t for t in todo if t[2] is not None]
        if not todo:
            continue
        for name, mod, mconf in todo:
            if mod.in_features * mconf.bits % 32 or mod.out_features * mconf.bits % 32:
                raise UsageError(f"{prefix}{name} ({mod.in_features}x{mod.out_features}) cannot be packed at "
                                 f"{mconf.bits} bits; skip it with dynamic={{'-:{prefix}{name}': {{}}}}")
        if not needs_h:
            H = None  # plain round-to-nearest needs no activations
        else:
            H = hessians[i] if i in hessians else _step_hessian(layer, step[0][1], inputs)
        # Linears of a step with the same settings are solved as one stacked weight: GPTQ treats
        # rows independently given the shared Hessian, so the result is the same, with one
        # Cholesky and one column loop instead of several.
        batches: dict[str, list] = {}
        for item in todo:
            batches.setdefault(json.dumps(item[2].to_dict(), sort_keys=True), []).append(item)
        for batch in batches.values():
            mconf = batch[0][2]
            result = _quantize_weight(torch.cat([mod.weight.data.float() for _, mod, _ in batch]), H, mconf)
            row = 0
            for name, mod, _ in batch:
                rows = slice(row, row + mod.out_features)
                row += mod.out_features
                packed = pack_gptq(result.codes[rows], result.zeros[:, rows], result.scales[:, rows],
                                   result.g_idx.clone(), mconf.bits)
                mod.weight.data = result.dequantized[rows].to(mod.weight.dtype)
                for k, v in packed.items():
                    tensors[f"{name}.{k}"] = v
                if mod.bias is not None:
                    tensors[f"{name}.bias"] = mod.bias.data.to(torch.float16)
                stats[prefix + name] = {"bits": mconf.bits, "loss": round(float(result.row_loss[rows].sum()), 6)}
    quantized = {n.rsplit(".", 1)[0] for n in tensors}
    for name, p in layer.named_parameters():  # everything not quantized: as is, fp16
        if name.rsplit(".", 1)[0] not in quantized:
            tensors[name] = p.data.to(torch.float16)
            p.data = tensors[name].float()  # later layers see exactly what is saved
    return tensors, stats


def _quantization_config(config: GPTQConfig, calib_info: dict, stats: dict) -> dict:
    qc = {
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
        "bits": config.bits,
        "group_size": config.group_size,
        "desc_act": config.desc_act and config.method == "gptq",  # RTN has no column order
        "sym": config.sym,
        "damp_percent": config.damp_percent,
        "true_sequential": config.true_sequential,
        "static_groups": config.static_groups,
        "lm_head": config.lm_head,
    }
    if config.dynamic:
        qc["dynamic"] = config.to_gptq_dynamic()
    qc["llmshrink"] = {"config": config.to_dict(), "calibration": calib_info, "modules": stats}
    return qc


def quantize_checkpoint(source: str | os.PathLike, config: GPTQConfig, calib: torch.Tensor, out: str | os.PathLike,
                        calib_info: dict | None = None, overwrite: bool = False, progress: bool = True,
                        max_shard_bytes: int = 2 * 2**30) -> Path:
    """Quantize the model saved in folder `source` into a GPTQ checkpoint at `out`.

    Args:
        source: a transformers folder with safetensors weights.
        config: how to quantize.
        calib: [nsamples, seqlen] calibration token ids.
        out: the checkpoint folder to write (renamed into place when complete).
        calib_info: how `calib` was made, recorded in the checkpoint.
        overwrite: replace an existing non-empty `out`.
        max_shard_bytes: larger checkpoints are split into shards with an index.
    Returns:
        The checkpoint folder.
    """
    source, out = Path(source), Path(out)
    calib_info = calib_info or {}
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"{out} already exists and is not empty; choose another --out or pass --overwrite")
    if config.lm_head:
        raise UsageError("lm_head quantization is not implemented yet; leave lm_head off")
    index = TensorIndex(source)
    model = _empty_model(source)
    spec = arch_for(model)
    layers = decoder_layers(model, spec)
    layer_prefix = spec.layers + "."
    key_of = {name: key for key, name in checkpoint_names(model, index.keys()).items()}
    _load_into(model, "", index, key_of, skip=layer_prefix)  # embeddings, final norm, head: kept throughout
    for name, p in model.named_parameters():
        if not name.startswith(layer_prefix) and p.device.type != "meta":
            p.data = p.data.to(torch.float16).float()  # as saved, so calibration sees the stored values
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta" and not n.startswith(layer_prefix)]
    if missing:
        raise UsageError(f"{source} lacks {missing[0]}; the checkpoint does not match its config")

    partial = out.with_name(out.name + ".partial")
    state_file = partial / "state.json"
    run_id = {"source": str(source.resolve()), "config": config.to_dict(), "calibration": calib_info,
              "calib_shape": list(calib.shape)}
    done = 0
    if state_file.is_file():
        state = json.loads(state_file.read_text())
        if state["run"] != run_id:
            raise UsageError(f"{partial} holds an unfinished run with other settings; delete it or use another --out")
        done = state["done_layers"]
        logger.info("resuming after layer %d of %d", done, len(layers))
    else:
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True)

    needs_h = _needs_hessian(config)
    inputs = _capture_first_inputs(model, layers, calib) if needs_h else []  # plain RTN: no activations
    if done and needs_h:
        saved = load_file(str(partial / "inputs.safetensors"))["hidden"]
        inputs = [(h, kw) for h, (_, kw) in zip(saved.split(_BATCH), inputs)]

    all_stats: dict = {}
    bar = tqdm(range(len(layers)), desc="quantize", unit="layer", disable=not progress, initial=done)
    for i in range(done, len(layers)):
        layer = layers[i]
        prefix = f"{layer_prefix}{i}."
        _load_into(layer, prefix, index, key_of)
        index.release()
        tensors, stats = _quantize_layer(layer, prefix, spec, inputs, config)
        save_tensors({prefix + k: v for k, v in tensors.items()}, partial / f"layer-{i:05d}.safetensors")
        if needs_h:
            outputs = _run_layer(layer, inputs)
            inputs = [(h, kw) for h, (_, kw) in zip(outputs, inputs)]
            save_tensors({"hidden": torch.cat(outputs)}, partial / "inputs.safetensors")
        (partial / f"layer-{i:05d}.json").write_text(json.dumps(stats))
        tmp = state_file.with_name(".state.json.tmp")
        tmp.write_text(json.dumps({"run": run_id, "done_layers": i + 1}))
        os.replace(tmp, state_file)
        layer.to("meta")  # free the layer's weights
        bar.update(1)
    bar.close()

    tensors: dict[str, torch.Tensor] = {}
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        if not name.startswith(layer_prefix) and name in key_of:
            tensors[name] = p.data.to(torch.float16) if p.is_floating_point() else p.data
    for i in range(len(layers)):  # left on disk until written: saving holds one tensor at a time
        layer_file = TensorIndex.of_file(partial / f"layer-{i:05d}.safetensors")
        tensors.update({key: StoredTensor(layer_file, key) for key in layer_file.keys()})
        all_stats.update(json.loads((partial / f"layer-{i:05d}.json").read_text()))
    tensors = {_checkpoint_key(name, key_of): t for name, t in tensors.items()}
    qc = _quantization_config(config, calib_info, all_stats)
    model.config.quantization_config = qc
    model.config.dtype = torch.float16
    with atomic_dir(out) as tmp:
        save_shards(tensors, tmp, max_shard_bytes)
        model.config.save_pretrained(tmp)
        (tmp / "quantize_config.json").write_text(json.dumps({k: v for k, v in qc.items()}, indent=2) + "\n")
        if model.generation_config is not None:
            model.generation_config.save_pretrained(tmp)
        for f in source.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens", "chat_template", "vocab", "merges")):
                shutil.copy2(f, tmp / f.name)
    shutil.rmtree(partial)
    return out
