"""Quantize what one decoder layer holds, and the output head, into GPTQ tensors.

A layer's linears come in steps (`arch.layer_linears`: q/k/v, o, gate/up, down for Llama); the
linears of a step share their input, hence one Hessian, and are solved together. The weights are
then replaced by what the packed tensors decode to, so the following steps and layers see the
quantized model. How a weight is solved is the config's algorithm (`GPTQConfig.solver`).
"""

from __future__ import annotations

import json

import torch

from ..arch import layer_linears
from ..errors import UsageError
from .algorithm import fp_target_weight
from .config import GPTQConfig
from .packing import pack_gptq
from .passes import Passes, outputs_seeing, replay_block

__all__ = ["fp_forward", "head_hessian", "head_of", "quantize_head", "quantize_layer"]


def head_of(model) -> tuple[str, torch.nn.Linear] | None:
    """(name, module) of the model's output head, if it is a linear."""
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        return None
    return next(name for name, m in model.named_modules() if m is head), head


def quantize_layer(layer, prefix: str, spec, inputs, config: GPTQConfig, dtype: torch.dtype = torch.float32,
                   fp_inputs=None) -> tuple[dict, dict, list, bool, list]:
    """Quantize one loaded (float32) layer in place: weights are replaced by their dequantized
    values and everything is cast to `dtype`, the calibration dtype, for the forwards.

    Linears of one step share an input, so they share one Hessian. With `true_sequential` each
    step's Hessian is taken after the steps before it were quantized; otherwise all come from the
    unquantized layer. With `fp_inputs` (the full-precision model's inputs of this layer, per
    batch as `inputs`; `config.fp_target`), each step is solved against the full-precision
    layer's outputs (`algorithm.fp_target_weight`). Returns (tensors to save under `prefix`,
    per-module stats, the layer's outputs for the calibration inputs, empty when no activations
    are needed, whether the layer returns them in a tuple, and the full-precision layer's outputs
    for `fp_inputs`, empty without them)."""
    steps = layer_linears(layer, spec, factors=True)  # a factorized linear's V and U are quantized in turn
    needs_h = config.needs_activations
    masters = {name: p.data for name, p in layer.named_parameters()}  # float32, what is quantized and saved
    for p in layer.parameters():
        p.data = p.data.to(dtype)
    fp_step_inputs, fp_outputs = fp_forward(layer, steps, fp_inputs) if fp_inputs is not None else ([], [])
    passes = Passes(layer, inputs)
    try:
        def hessian(i, block=None):
            if not fp_step_inputs:
                return passes.hessian(steps[i][0][1], block), None
            return passes.hessian(steps[i][0][1], block, paired=fp_step_inputs[i])

        hessians = {} if config.true_sequential or not needs_h else {i: hessian(i) for i in range(len(steps))}
        tensors, stats = {}, {}
        for i, step in enumerate(steps):
            todo = [(name, mod, config.for_module(prefix + name)) for name, mod in step]
            todo = [t for t in todo if t[2] is not None]
            if not todo:
                continue
            for name, mod, mconf in todo:
                _check_packable(prefix + name, mod, mconf.bits, f"skip it with dynamic={{'-:{prefix}{name}': {{}}}}")
            if not needs_h:
                H, M = None, None  # plain round-to-nearest needs no activations
            elif i in hessians:
                H, M = hessians[i]
            else:
                H, M = hessian(i, replay_block(layer, steps, i, inputs[0][0].shape[-1]))
            _quantize_step(todo, H, masters, tensors, stats, prefix, M)
            passes.replay_pending()
        packed = {n[: -len("qweight")] + "weight" for n in tensors if n.endswith(".qweight")}
        for name, p in layer.named_parameters():  # everything else, biases too: as is, fp16
            if name in packed:
                continue
            tensors[name] = masters[name].to(torch.float16)
            p.data = tensors[name].to(dtype)  # later layers see what is saved
        outputs = passes.outputs() if needs_h else []
        return tensors, stats, outputs, passes.tuple_output, fp_outputs
    finally:
        passes.close()


def fp_forward(layer, steps, inputs) -> tuple[list[list[torch.Tensor]], list[torch.Tensor]]:
    """Run the (still unquantized) `layer` on `inputs`: (per step of `steps`, its inputs per batch;
    the layer's outputs per batch)."""
    seen: list[list[torch.Tensor]] = [[] for _ in steps]
    outputs = outputs_seeing(layer, steps, inputs, lambda k, x: seen[k].append(x))
    return seen, outputs


def quantize_head(model, layers, final: list[tuple[torch.Tensor, dict]], config: GPTQConfig,
                  tuple_output: bool) -> tuple[dict, dict]:
    """Quantize the output head (lm_head) on the calibration text, after every layer is done.

    Its inputs' Hessian is `head_hessian`'s. A head tied to the input embeddings is untied: the
    embeddings stay as they are (or are quantized on their own, `embedding.py`), the head gets its
    own quantized tensors."""
    name, head = head_of(model)
    mconf = config.for_module(name)
    _check_packable(name, head, mconf.bits, "leave lm_head off")
    H = head_hessian(model, layers, final, tuple_output)
    head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)  # untie
    tensors, stats = {}, {}
    masters = {f"{name}.{k}": v.data.float() for k, v in head.named_parameters()}
    _quantize_step([(name, head, mconf)], H, masters, tensors, stats, prefix="")
    if head.bias is not None:
        tensors[f"{name}.bias"] = head.bias.data.to(torch.float16)
    return tensors, stats


def head_hessian(model, layers, final: list[tuple[torch.Tensor, dict]], tuple_output: bool) -> torch.Tensor | None:
    """Hessian [in, in] of the output head's inputs on the calibration text, or None where no
    activations were kept (plain RTN).

    Its inputs (the last layer's outputs through the final norm and whatever else the model
    applies) come from the model's own forward with each decoder layer standing in by the saved
    last-layer outputs `final`; the pass stops at the head, so no logits are computed."""
    if not final:
        return None
    _, head = head_of(model)
    # token ids only give the forward its shapes: every decoder layer ignores its input
    passes = Passes(lambda hidden, **kwargs: model(input_ids=torch.zeros(hidden.shape[:2], dtype=torch.long),
                                                   use_cache=False), final)

    def stand_in(*args, **kwargs):
        out = final[passes.batch][0]
        return (out,) if tuple_output else out

    for layer in layers:
        layer.forward = stand_in
    try:
        return passes.hessian(head)
    finally:
        for layer in layers:
            del layer.forward


def _check_packable(name: str, mod: torch.nn.Linear, bits: int, fix: str) -> None:
    if mod.in_features * bits % 32 or mod.out_features * bits % 32:
        raise UsageError(f"{name} ({mod.in_features}x{mod.out_features}) cannot be packed at {bits} bits; {fix}")


def _quantize_step(todo, H, masters: dict, tensors: dict, stats: dict, prefix: str, M=None) -> None:
    """Quantize the linears of one step (sharing Hessian `H`; float32 weights in `masters` by
    parameter name), filling `tensors` and `stats`; with `M` (the cross moment of the quantized
    and full-precision inputs), against the full-precision outputs (`fp_target_weight`).

    Linears with the same settings are solved as one stacked weight: GPTQ treats rows
    independently given the shared Hessian, so the result is the same, with one Cholesky and one
    column loop instead of several."""
    batches: dict[str, list] = {}
    for item in todo:
        batches.setdefault(json.dumps(item[2].to_dict(), sort_keys=True), []).append(item)
    for batch in batches.values():
        mconf = batch[0][2]
        weight = torch.cat([masters[f"{name}.weight"] for name, _, _ in batch])  # [sum of out, in]
        if M is not None:
            weight = fp_target_weight(weight, H, M, mconf.damp_percent, mconf.fp_target)
        result = mconf.solver.quantize(weight, H, mconf)
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
