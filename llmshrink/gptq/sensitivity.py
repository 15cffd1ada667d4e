"""How much each linear's quantization at each candidate width is predicted to cost the model.

For a linear y = W x quantized to W + dW, the output error on the calibration inputs is
dW_j H dW_j^T per output channel j (H the inputs' second moment, which GPTQ accumulates anyway).
Layer-local errors are not comparable across layers: an error in an early down_proj and one in a
late q_proj move the loss differently. A second-order expansion of the loss in the linear's
output, with the Fisher's diagonal f_j = E[(dL/dy_j)^2] standing in for its Hessian, weighs them:
predicted dL = 1/2 sum_j f_j dW_j H dW_j^T. `output_fisher` measures f with one backward pass of
the full-precision model over calibration windows; `layer_losses` solves each linear at every
candidate width (with the config's algorithm) on one layer's inputs and records both the plain
and the Fisher-weighted error, so a report can measure which predicts the real loss better.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from ..arch import layer_linears
from .config import GPTQConfig
from .passes import Passes

__all__ = ["CRITERIA", "FISHER_WINDOWS", "layer_losses", "output_fisher"]

FISHER_WINDOWS = 32  # a diagonal average over 16k tokens: more windows move it little
CRITERIA = ("fisher", "hessian")  # the Fisher-weighted output error; the plain one


def output_fisher(source: Path, calib: torch.Tensor, names: list[str], windows: int = FISHER_WINDOWS,
                  batch: int = 2) -> dict[str, torch.Tensor]:
    """Per linear in `names`: the mean over tokens of (d loss / d y_j)^2 for each output channel j,
    the loss being the summed next-token cross-entropy of the full-precision model on the first
    `windows` rows of `calib` [nsamples, seqlen]. Only activations carry gradients."""
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, trust_remote_code=False).eval()
    model.requires_grad_(False)
    sums = {name: None for name in names}
    tokens = 0

    def keep(name):
        def hook(module, args, out):
            def add(grad):
                sq = grad.detach().float().pow(2).reshape(-1, grad.shape[-1]).sum(0)
                sums[name] = sq if sums[name] is None else sums[name] + sq
            out.register_hook(add)
        return hook

    handles = [model.get_submodule(n).register_forward_hook(keep(n)) for n in names]
    handles.append(model.get_input_embeddings().register_forward_hook(lambda m, a, out: out.requires_grad_()))
    try:
        for ids in calib[:windows].split(batch):
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                     reduction="sum")
            loss.backward()
            tokens += ids.numel()
    finally:
        for h in handles:
            h.remove()
    del model
    return {name: s / tokens for name, s in sums.items()}


def layer_losses(layer, prefix: str, spec, inputs: list[tuple[torch.Tensor, dict]], config: GPTQConfig,
                 candidates: tuple[int, ...], fisher: dict[str, torch.Tensor], dtype: torch.dtype
                 ) -> tuple[dict[str, dict[int, dict[str, float]]], list[torch.Tensor]]:
    """Every linear of one loaded (float32) layer that `config` quantizes, solved at each width of
    `candidates` on the full-precision inputs (the layer is left unchanged).

    Returns (per linear name with `prefix`, per width: {"fisher": ..., "hessian": ...} predicted
    losses; the layer's outputs, the next layer's inputs)."""
    masters = {name: p.data for name, p in layer.named_parameters()}
    for p in layer.parameters():
        p.data = p.data.to(dtype)
    passes = Passes(layer, inputs)
    losses: dict[str, dict[int, dict[str, float]]] = {}
    try:
        for step in layer_linears(layer, spec):
            todo = [(name, mod, config.for_module(prefix + name)) for name, mod in step]
            todo = [t for t in todo if t[2] is not None]
            if not todo:
                continue
            H = passes.hessian(step[0][1])
            batches: dict[str, list] = {}  # linears with the same settings: one solve per width
            for item in todo:
                batches.setdefault(json.dumps(item[2].to_dict(), sort_keys=True), []).append(item)
            for batch in batches.values():
                weight = torch.cat([masters[f"{name}.weight"] for name, _, _ in batch])
                for bits in candidates:
                    mconf = dataclasses.replace(batch[0][2], bits=bits)
                    dW = mconf.solver.quantize(weight, H, mconf).dequantized - weight
                    err = ((dW @ H) * dW).sum(1) / 2  # per output channel: mean squared output error
                    row = 0
                    for name, mod, _ in batch:
                        rows = err[row: row + mod.out_features]
                        row += mod.out_features
                        f = fisher[prefix + name].to(rows)
                        losses.setdefault(prefix + name, {})[bits] = {"hessian": float(rows.sum()),
                                                                      "fisher": float((f * rows).sum() / 2)}
        outputs = passes.outputs()
    finally:
        passes.close()
    for name, p in layer.named_parameters():
        p.data = masters[name]
    return losses, outputs

