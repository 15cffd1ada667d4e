"""Walk a model layer by layer: capture inputs, accumulate Hessians, quantize, save GPTQ tensors.

Only one decoder layer's weights are in memory at a time: the model is built empty (accelerate's
`init_empty_weights`), the embeddings and head are loaded, and each layer is loaded from the
safetensors files when its turn comes and emptied after. Finished layers and the next layer's
inputs are kept in `<out>.partial/`, so a run that is interrupted resumes from the last finished
layer and writes the same checkpoint.
"""

from __future__ import annotations

import dataclasses
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
from ..errors import Interrupted, UsageError
from ..io import atomic_dir, fingerprint, fingerprint_change, prepare_out, tensor_sha256
from ..safetensors_io import StoredTensor, TensorIndex, save_shards, save_tensors
from .algorithm import accumulate_hessian
from .compat import vllm_limits, whole_group_size
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
        set_module_tensor_to_device(module, name, "cpu", value=tensor.float() if tensor.is_floating_point() else tensor)


def _check_finite(index: TensorIndex) -> None:
    """Every floating tensor of the source is finite, checked before any work (one tensor at a time)."""
    for key in index.keys():
        if index.dtype_name(key) in ("F64", "F32", "F16", "BF16"):
            tensor = index.get(key)
            if not torch.isfinite(tensor).all():
                raise UsageError(f"{key} holds NaN or Inf values (in {index.folder}); the model cannot be "
                                 "quantized until they are fixed")
    index.release()


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


def native_bf16_cpu() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX): bf16 forwards pay there."""
    return getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() \
        or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()


def calib_dtype(config: GPTQConfig) -> torch.dtype:
    """The dtype of the calibration forwards `config.calib_dtype` asks for on this machine."""
    if config.calib_dtype != "auto":
        return getattr(torch, config.calib_dtype)
    return torch.bfloat16 if torch.cuda.is_available() or native_bf16_cpu() else torch.float32


def _cast_floats(value, dtype: torch.dtype):
    """`value` (a tensor, or tuples/lists/dicts of them) with floating tensors cast to `dtype`."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_cast_floats(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _cast_floats(v, dtype) for k, v in value.items()}
    return value


def _capture_first_inputs(model, layers, calib: torch.Tensor, dtype: torch.dtype) -> list[tuple[torch.Tensor, dict]]:
    """Hidden states and keyword arguments reaching the first decoder layer, per batch, with
    floating tensors (hidden states, rotary tables, masks) in the calibration dtype."""
    captured: list[tuple[torch.Tensor, dict]] = []

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "use_cache")}
        captured.append((hidden.to(dtype), _cast_floats(kwargs, dtype)))
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


class _Passes:
    """Calibration passes over one decoder layer that skip work whose result can no longer change.

    A block of the layer (its attention, its MLP) whose output is exactly the output of its last
    linear is, once that linear's inputs have been seen with the block's other linears already
    quantized, replayed: later passes take the (now quantized) linear applied once to the saved
    inputs instead of running the block again. Attention is then computed once per layer instead of four
    times (Llama's true-sequential steps q/k/v, o, gate/up, down, then the output pass). Blocks
    whose last linear is wider than the hidden states (the MLP's down_proj) are not replayed: their
    saved inputs would cost more memory than the pass saves. The result is the same as running
    every pass in full."""

    def __init__(self, layer, inputs: list[tuple[torch.Tensor, dict]]):
        """`layer`: the decoder layer, or any callable of (hidden, **kwargs) that runs through it."""
        self.layer, self.inputs = layer, inputs
        self.batch = 0
        self.replayed: list[torch.nn.Module] = []
        self._pending = None
        self.tuple_output = False  # whether the layer returns a tuple (hidden, ...), seen in outputs()

    def hessian(self, module: torch.nn.Module, block: torch.nn.Module | None = None) -> torch.Tensor:
        """Hessian of the inputs reaching `module`, each pass stopping as soon as they are seen.

        With `block` (the child of the layer whose output `module` produces), the inputs are also
        kept so that `replay_pending()` can stand in for the block afterwards."""
        state = {"H": None, "n": 0}
        saved: list[torch.Tensor] = []
        seen: dict = {}  # the first batch's outputs of `module` and of `block`

        def pre_hook(mod, args):
            state["H"], state["n"] = accumulate_hessian(state["H"], state["n"], args[0])
            if block is None:
                raise _Stop
            saved.append(args[0])
            if self.batch:  # the first batch runs on through the block to show how its output is built
                raise _Stop

        def linear_out(mod, args, out):
            seen["linear"] = out

        def block_out(mod, args, out):
            seen["block"] = out
            raise _Stop

        handles = [module.register_forward_pre_hook(pre_hook)]
        if block is not None:
            handles += [module.register_forward_hook(linear_out), block.register_forward_hook(block_out)]
        try:
            self._run(lambda out: None)
        finally:
            for h in handles:
                h.remove()
        if block is not None:
            template = _output_template(seen.get("block"), seen.get("linear"))
            self._pending = (block, module, saved, template) if template is not None else None
        return state["H"]

    def replay_pending(self) -> None:
        """Stand in for the block seen by the last `hessian(..., block)` call, if its output is
        exactly its linear's output (checked on the first batch)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        block, linear, saved, template = pending

        outputs: list[torch.Tensor | None] = [None] * len(saved)

        def forward(*args, **kwargs):
            b = self.batch
            if outputs[b] is None:  # the quantized linear on its saved inputs, once per batch
                outputs[b], saved[b] = linear(saved[b]), None
            return outputs[b] if template is _TENSOR else (outputs[b], *template[1:])

        block.forward = forward  # instance attribute, removed by close()
        self.replayed.append(block)

    def outputs(self) -> list[torch.Tensor]:
        outs: list[torch.Tensor] = []

        def collect(out):
            self.tuple_output = isinstance(out, tuple)
            outs.append(out[0] if self.tuple_output else out)

        self._run(collect)
        return outs

    def close(self) -> None:
        for block in self.replayed:
            del block.forward
        self.replayed.clear()

    def _run(self, collect) -> None:
        with torch.no_grad():
            for self.batch, (hidden, kwargs) in enumerate(self.inputs):
                try:
                    collect(self.layer(hidden, **kwargs))
                except _Stop:
                    pass


_TENSOR = object()  # template of a block that returns its linear's output as a bare tensor


def _output_template(block_out, linear_out):
    """How a block's output is built from its last linear's output: _TENSOR when it is that
    tensor, the tuple when it is that tensor followed by Nones, else None (cannot replay)."""
    if linear_out is None:
        return None
    if block_out is linear_out:
        return _TENSOR
    if isinstance(block_out, tuple) and block_out and block_out[0] is linear_out \
            and all(x is None for x in block_out[1:]):
        return block_out
    return None


def _replay_block(layer, steps, i: int, hidden_size: int) -> torch.nn.Module | None:
    """The child of `layer` that step `i`'s single linear finishes (every other linear of the
    child quantized in earlier steps), or None."""
    if len(steps[i]) != 1 or "." not in steps[i][0][0] or steps[i][0][1].in_features > hidden_size:
        return None  # saving inputs wider than the hidden states would cost more memory than it is worth
    child = steps[i][0][0].split(".", 1)[0]
    later = [name for step in steps[i + 1:] for name, _ in step]
    return None if any(n.split(".", 1)[0] == child for n in later) else layer.get_submodule(child)


def _quantize_layer(layer, prefix: str, spec, inputs, config: GPTQConfig,
                    dtype: torch.dtype = torch.float32) -> tuple[dict, dict, list, bool]:
    """Quantize one loaded (float32) layer in place: weights are replaced by their dequantized
    values and everything is cast to `dtype`, the calibration dtype, for the forwards.

    Linears of one step share an input, so they share one Hessian. With `true_sequential` each
    step's Hessian is taken after the steps before it were quantized; otherwise all come from the
    unquantized layer. Returns (tensors to save under `prefix`, per-module stats, the layer's
    outputs for the calibration inputs, empty when no activations are needed, and whether the
    layer returns them in a tuple)."""
    steps = layer_linears(layer, spec)
    needs_h = config.needs_activations
    masters = {name: p.data for name, p in layer.named_parameters()}  # float32, what is quantized and saved
    for p in layer.parameters():
        p.data = p.data.to(dtype)
    passes = _Passes(layer, inputs)
    try:
        hessians = {} if config.true_sequential or not needs_h else {i: passes.hessian(step[0][1])
                                                                      for i, step in enumerate(steps)}
        tensors, stats = {}, {}
        for i, step in enumerate(steps):
            todo = [(name, mod, config.for_module(prefix + name)) for name, mod in step]
            todo = [t for t in todo if t[2] is not None]
            if not todo:
                continue
            for name, mod, mconf in todo:
                _check_packable(prefix + name, mod, mconf.bits, f"skip it with dynamic={{'-:{prefix}{name}': {{}}}}")
            if not needs_h:
                H = None  # plain round-to-nearest needs no activations
            elif i in hessians:
                H = hessians[i]
            else:
                H = passes.hessian(step[0][1], _replay_block(layer, steps, i, inputs[0][0].shape[-1]))
            _quantize_step(todo, H, masters, tensors, stats, prefix)
            passes.replay_pending()
        packed = {n[: -len("qweight")] + "weight" for n in tensors if n.endswith(".qweight")}
        for name, p in layer.named_parameters():  # everything else, biases too: as is, fp16
            if name in packed:
                continue
            tensors[name] = masters[name].to(torch.float16)
            p.data = tensors[name].to(dtype)  # later layers see what is saved
        outputs = passes.outputs() if needs_h else []
        return tensors, stats, outputs, passes.tuple_output
    finally:
        passes.close()


def _check_packable(name: str, mod: torch.nn.Linear, bits: int, fix: str) -> None:
    if mod.in_features * bits % 32 or mod.out_features * bits % 32:
        raise UsageError(f"{name} ({mod.in_features}x{mod.out_features}) cannot be packed at {bits} bits; {fix}")


def _quantize_step(todo, H, masters: dict, tensors: dict, stats: dict, prefix: str) -> None:
    """Quantize the linears of one step (sharing Hessian `H`; float32 weights in `masters` by
    parameter name), filling `tensors` and `stats`.

    Linears with the same settings are solved as one stacked weight: GPTQ treats rows
    independently given the shared Hessian, so the result is the same, with one Cholesky and one
    column loop instead of several."""
    batches: dict[str, list] = {}
    for item in todo:
        batches.setdefault(json.dumps(item[2].to_dict(), sort_keys=True), []).append(item)
    for batch in batches.values():
        mconf = batch[0][2]
        result = mconf.solver.quantize(torch.cat([masters[f"{name}.weight"] for name, _, _ in batch]), H, mconf)
        row = 0
        for name, mod, _ in batch:
            rows = slice(row, row + mod.out_features)
            row += mod.out_features
            packed = pack_gptq(result.codes[rows], result.zeros[:, rows], result.scales[:, rows],
                               result.g_idx.clone(), mconf.bits)
            mod.weight.data = result.dequantized[rows].to(mod.weight.dtype)
            for k, v in packed.items():
                tensors[f"{name}.{k}"] = v
            stats[prefix + name] = {"bits": mconf.bits, "loss": round(float(result.row_loss[rows].sum()), 6)}


def _head_of(model) -> tuple[str, torch.nn.Linear] | None:
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        return None
    return next(name for name, m in model.named_modules() if m is head), head


def _quantize_head(model, layers, final: list[tuple[torch.Tensor, dict]], config: GPTQConfig,
                   tuple_output: bool) -> tuple[dict, dict]:
    """Quantize the output head (lm_head) on the calibration text, after every layer is done.

    Its inputs (the last layer's outputs through the final norm and whatever else the model
    applies) come from the model's own forward with each decoder layer standing in by the saved
    last-layer outputs. A head tied to the input embeddings is untied: the embeddings stay as
    they are, the head gets its own quantized tensors."""
    name, head = _head_of(model)
    mconf = config.for_module(name)
    _check_packable(name, head, mconf.bits, "leave lm_head off")
    # token ids only give the forward its shapes: every decoder layer ignores its input
    passes = _Passes(lambda hidden, **kwargs: model(input_ids=torch.zeros(hidden.shape[:2], dtype=torch.long),
                                                    use_cache=False), final)

    def stand_in(*args, **kwargs):
        out = final[passes.batch][0]
        return (out,) if tuple_output else out

    H = None  # plain RTN has no activations and needs none
    if final:
        for layer in layers:
            layer.forward = stand_in
        try:
            H = passes.hessian(head)
        finally:
            for layer in layers:
                del layer.forward
    head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)  # untie
    tensors, stats = {}, {}
    masters = {f"{name}.{k}": v.data.float() for k, v in head.named_parameters()}
    _quantize_step([(name, head, mconf)], H, masters, tensors, stats, prefix="")
    if head.bias is not None:
        tensors[f"{name}.bias"] = head.bias.data.to(torch.float16)
    return tensors, stats


def _quantized_linears(config: GPTQConfig, model, layers, spec, layer_prefix: str) -> dict[str, tuple]:
    """Per linear that `config` quantizes: (its config, in_features)."""
    found = {}
    for i, layer in enumerate(layers):
        for step in layer_linears(layer, spec):
            for name, module in step:
                mconf = config.for_module(f"{layer_prefix}{i}.{name}")
                if mconf is not None:
                    found[f"{layer_prefix}{i}.{name}"] = (mconf, module.in_features)
    head = _head_of(model) if config.lm_head else None
    if head is not None and config.for_module(head[0]) is not None:
        found[head[0]] = (config.for_module(head[0]), head[1].in_features)
    return found


def _whole_groups(config: GPTQConfig, model, layers, spec, layer_prefix: str) -> tuple[GPTQConfig, dict]:
    """`config` with a group size that gives every linear whole groups (see GPTQConfig.group_size),
    and vLLM's verdict on the result ({"gpu": why not or None, "cpu": ...}; said in one warning
    line before any work)."""
    linears = _quantized_linears(config, model, layers, spec, layer_prefix)
    if not config.partial_groups:
        widths = [n for mconf, n in linears.values() if mconf.group_size == config.group_size]
        size = whole_group_size(config.group_size, widths)
        if size != config.group_size:
            odd = next(name for name, (m, n) in linears.items() if m.group_size == config.group_size and n % config.group_size)
            logger.info("group_size=%d leaves %s (%d inputs) a partial last group; using group_size=%d, which "
                        "divides every linear (partial_groups=True keeps %d)", config.group_size, odd,
                        linears[odd][1], size, config.group_size)
            config = dataclasses.replace(config, group_size=size)
            linears = _quantized_linears(config, model, layers, spec, layer_prefix)
    modules = {name: (m.bits, m.group_size, m.sym, n) for name, (m, n) in linears.items()}
    verdict = {backend: vllm_limits(modules, _stored_desc_act(config), cpu=backend == "cpu") for backend in ("gpu", "cpu")}
    if verdict["gpu"]:
        logger.warning("vLLM will not serve this checkpoint: %s", verdict["gpu"])
    elif verdict["cpu"]:
        logger.warning("vLLM will serve this checkpoint on GPUs only: %s", verdict["cpu"])
    return config, verdict


def _stored_desc_act(config: GPTQConfig) -> bool:
    """The layout's desc_act: act-order with static groups stores g_idx = i // group_size, which
    readers must be told is no reordering (vLLM refuses desc_act=True checkpoints)."""
    return config.act_order and not config.static_groups


def _run_change(saved: dict, now: dict) -> str:
    """What differs between the run recorded in a .partial folder and this one, in a few words."""
    if "source_files" not in saved:
        return "it was begun by an older llmshrink, which did not record its input"
    if saved.get("source") == now["source"]:
        change = fingerprint_change(saved["source_files"], now["source_files"])
        if change:
            return f"the source model's {change}"
    if saved.get("source") != now["source"]:
        return f"it quantized {saved.get('source')}"
    if saved.get("config") != now["config"]:
        return "other quantization settings"
    return "other calibration windows"


def _quantization_config(config: GPTQConfig, calib_info: dict, stats: dict, requested_group_size: int,
                         vllm: dict) -> dict:
    qc = {
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
        "bits": config.bits,
        "group_size": config.group_size,
        "desc_act": _stored_desc_act(config),  # the act-order used is recorded under "llmshrink" below
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
    prepare_out(out, overwrite)
    index = TensorIndex(source)
    _check_finite(index)
    model = _empty_model(source)
    if config.lm_head and _head_of(model) is None:
        raise UsageError(f"{source} has no linear output head to quantize; leave lm_head off")
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
    requested_group_size = config.group_size
    config, vllm = _whole_groups(config, model, layers, spec, layer_prefix)

    partial = out.with_name(out.name + ".partial")
    state_file = partial / "state.json"
    dtype = calib_dtype(config)
    calib_info = {**calib_info, "dtype": str(dtype).removeprefix("torch.")}
    run_id = {"source": str(source.resolve()), "config": config.to_dict(), "calibration": calib_info,
              "calib_shape": list(calib.shape), "source_files": fingerprint(source),
              "calib_sha256": tensor_sha256(calib.long())}
    done, tuple_output = 0, False
    if state_file.is_file():
        state = json.loads(state_file.read_text())
        if state["run"] != run_id:
            raise UsageError(f"{partial} holds an unfinished run of other input ({_run_change(state['run'], run_id)}); "
                             "delete it to start over, or use another --out")
        done = state["done_layers"]
        tuple_output = state.get("tuple_output", False)
        logger.info("resuming after layer %d of %d", done, len(layers))
    else:
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True)

    needs_h = config.needs_activations
    inputs = _capture_first_inputs(model, layers, calib, dtype) if needs_h else []  # plain RTN: no activations
    if done and needs_h:
        saved = load_file(str(partial / "inputs.safetensors"))["hidden"]
        inputs = [(h, kw) for h, (_, kw) in zip(saved.split(_BATCH), inputs)]

    all_stats: dict = {}
    bar = tqdm(range(len(layers)), desc="quantize", unit="layer", disable=not progress, initial=done)
    try:
        for i in range(done, len(layers)):
            layer = layers[i]
            prefix = f"{layer_prefix}{i}."
            _load_into(layer, prefix, index, key_of)
            index.release()
            tensors, stats, outputs, tuple_output = _quantize_layer(layer, prefix, spec, inputs, config, dtype)
            save_tensors({prefix + k: v for k, v in tensors.items()}, partial / f"layer-{i:05d}.safetensors")
            if needs_h:
                inputs = [(h, kw) for h, (_, kw) in zip(outputs, inputs)]
                save_tensors({"hidden": torch.cat(outputs)}, partial / "inputs.safetensors")
            (partial / f"layer-{i:05d}.json").write_text(json.dumps(stats))
            tmp = state_file.with_name(".state.json.tmp")
            tmp.write_text(json.dumps({"run": run_id, "done_layers": i + 1, "tuple_output": tuple_output}))
            os.replace(tmp, state_file)
            layer.to("meta")  # free the layer's weights
            bar.update(1)
    except UsageError:
        shutil.rmtree(partial, ignore_errors=True)  # the input is at fault: never resume from this run
        raise
    except KeyboardInterrupt:
        raise Interrupted(f"the finished layers are kept in {partial}: run the same command again to resume, "
                          "or delete that folder to discard them") from None
    bar.close()

    head_tensors: dict[str, torch.Tensor] = {}
    if config.lm_head and config.for_module(_head_of(model)[0]) is not None:
        head_tensors, head_stats = _quantize_head(model, layers, inputs, config, tuple_output)
        all_stats.update(head_stats)
        model.config.tie_word_embeddings = False  # the embeddings stay as they were
    tensors: dict[str, torch.Tensor] = {}
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        if not name.startswith(layer_prefix) and name in key_of and name.rsplit(".", 1)[0] + ".qweight" not in head_tensors:
            tensors[name] = p.data.to(torch.float16) if p.is_floating_point() else p.data
    tensors.update(head_tensors)
    for i in range(len(layers)):  # left on disk until written: saving holds one tensor at a time
        layer_file = TensorIndex.of_file(partial / f"layer-{i:05d}.safetensors")
        tensors.update({key: StoredTensor(layer_file, key) for key in layer_file.keys()})
        all_stats.update(json.loads((partial / f"layer-{i:05d}.json").read_text()))
    tensors = {_checkpoint_key(name, key_of): t for name, t in tensors.items()}
    qc = _quantization_config(config, calib_info, all_stats, requested_group_size, vllm)
    model.config.quantization_config = qc
    model.config.dtype = torch.float16
    source_config = json.loads((source / "config.json").read_text())
    # Where the source computes in bf16, float16 may overflow: loads on CUDA read this (see load.py).
    qc["llmshrink"]["source_dtype"] = source_config.get("dtype", source_config.get("torch_dtype"))
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
