"""Calibration forwards, one decoder layer at a time: what reaches the first layer, the Hessian of
each linear's inputs, and the layer's outputs, which are the next layer's inputs.

Forwards run in the calibration dtype (`calib_dtype`); Hessians are accumulated in float32
(`algorithm.accumulate_hessian`). A pass stops (`_Stop`, raised from a hook) as soon as what it
came for is seen, and blocks whose result can no longer change are replayed from saved inputs
instead of run again (`Passes`).
"""

from __future__ import annotations

from typing import Callable

import torch
from tqdm.auto import tqdm

from ..arch import decoder_layers
from ..kernels.cpu import native_bf16_cpu
from .algorithm import accumulate_cross, accumulate_hessian
from .config import GPTQConfig

__all__ = ["BATCH", "Passes", "calib_dtype", "capture_first_inputs", "outputs_seeing", "replay_block",
           "walk_layers"]

BATCH = 8  # calibration windows per layer forward


class _Stop(Exception):
    """Raised from a hook once the inputs it needed are captured."""


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


def capture_first_inputs(model, layers, calib: torch.Tensor, dtype: torch.dtype) -> list[tuple[torch.Tensor, dict]]:
    """Hidden states and keyword arguments reaching the first decoder layer, per batch of `BATCH`
    windows of `calib` [nsamples, seqlen], with floating tensors (hidden states, rotary tables,
    masks) in the calibration dtype."""
    captured: list[tuple[torch.Tensor, dict]] = []

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "use_cache")}
        captured.append((hidden.to(dtype), _cast_floats(kwargs, dtype)))
        raise _Stop

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in calib.split(BATCH):
                try:
                    model(input_ids=batch, use_cache=False)
                except _Stop:
                    pass
    finally:
        handle.remove()
    return captured


class Passes:
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

    def hessian(self, module: torch.nn.Module, block: torch.nn.Module | None = None,
                paired: list[torch.Tensor] | None = None):
        """Hessian of the inputs reaching `module`, each pass stopping as soon as they are seen.

        With `block` (the child of the layer whose output `module` produces), the inputs are also
        kept so that `replay_pending()` can stand in for the block afterwards. With `paired` (per
        batch, other inputs of `module`: the full-precision model's), returns (H, M) with M their
        cross moment (`accumulate_cross`)."""
        state = {"H": None, "n": 0, "M": None}
        saved: list[torch.Tensor] = []
        seen: dict = {}  # the first batch's outputs of `module` and of `block`

        def pre_hook(mod, args):
            if paired is not None:
                state["M"] = accumulate_cross(state["M"], state["n"], args[0], paired[self.batch])
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
        return state["H"] if paired is None else (state["H"], state["M"])

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
        """The layer's outputs (hidden states) per batch."""
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


def replay_block(layer, steps, i: int, hidden_size: int) -> torch.nn.Module | None:
    """The child of `layer` that step `i`'s single linear finishes (every other linear of the
    child quantized in earlier steps), or None. `steps`: the layer's `arch.layer_linears`."""
    if len(steps[i]) != 1 or "." not in steps[i][0][0] or steps[i][0][1].in_features > hidden_size:
        return None  # saving inputs wider than the hidden states would cost more memory than it is worth
    child = steps[i][0][0].split(".", 1)[0]
    later = [name for step in steps[i + 1:] for name, _ in step]
    return None if any(n.split(".", 1)[0] == child for n in later) else layer.get_submodule(child)


def outputs_seeing(layer, steps, inputs: list[tuple[torch.Tensor, dict]],
                   seen: Callable[[int, torch.Tensor], None]) -> list[torch.Tensor]:
    """The outputs of `layer` for `inputs`, per batch, with seen(k, x) called on every batch's
    input x of step k of `steps` (its first linear's input, which the step's linears share)."""
    handles = [step[0][1].register_forward_pre_hook(lambda mod, args, k=k: seen(k, args[0]))
               for k, step in enumerate(steps)]
    try:
        return Passes(layer, inputs).outputs()
    finally:
        for h in handles:
            h.remove()


# on_layer(i, steps, moment by linear name): steps as `walk_layers` takes them
OnLayer = Callable[[int, list[list[tuple[str, torch.nn.Linear]]], dict[str, torch.Tensor | None]], None]
# accumulate(moment so far or None, tokens so far, new inputs [..., in]) -> (moment, tokens)
Accumulate = Callable[[torch.Tensor | None, int, torch.Tensor], tuple[torch.Tensor, int]]


@torch.no_grad()
def walk_layers(model, calib: torch.Tensor | None, chosen: list[list[list[tuple[str, torch.nn.Linear]]]],
                on_layer: OnLayer, sequential: bool, progress: bool, desc: str,
                accumulate: Accumulate = accumulate_hessian) -> None:
    """Call on_layer(i, steps, moment by name) for every decoder layer up to the last with chosen
    linears, one layer's inputs held at a time, and pass the layer's outputs on to the next.

    Args:
        calib: [n, seqlen] token ids, or None: no forwards, every moment None.
        chosen: per decoder layer, its steps (linears that read the same input) as (name in the
            model, module); the first linear of each step is hooked, its moment serves the step.
        sequential: the outputs passed on are those of the layer after on_layer (which may have
            replaced its linears), else of the layer as it was (one layer forward less).
        accumulate: how a moment grows with each batch of inputs (default the second moment
            2/N X^T X of `accumulate_hessian`).
    """
    layers = decoder_layers(model)
    last = max(i for i, steps in enumerate(chosen) if steps)
    if calib is None:
        for i in tqdm(range(last + 1), desc=desc, unit="layer", disable=not progress):
            on_layer(i, chosen[i], {name: None for step in chosen[i] for name, _ in step})
        return
    dtype = next(model.parameters()).dtype
    inputs = capture_first_inputs(model, layers, calib, dtype)
    for i in tqdm(range(last + 1), desc=desc, unit="layer", disable=not progress):
        moments: list[dict] = [{"H": None, "n": 0} for _ in chosen[i]]

        def seen(k, x):
            state = moments[k]
            state["H"], state["n"] = accumulate(state["H"], state["n"], x)

        outputs = outputs_seeing(layers[i], chosen[i], inputs, seen)
        on_layer(i, chosen[i], {name: state["H"] for step, state in zip(chosen[i], moments) for name, _ in step})
        if sequential and i < last:
            outputs = Passes(layers[i], inputs).outputs()
        inputs = [(h, kw) for h, (_, kw) in zip(outputs, inputs)]
