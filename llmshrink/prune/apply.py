"""`llmshrink.prune`: measure on calibration text, then remove decoder layers or zero weights.

One pass over the calibration windows hooks every decoder layer (its input and output hidden
states, for the layer scores) or every decoder linear (the L2 norm of each input channel, for
Wanda); the pure math in `algorithm.py` turns those into choices, and this module edits the model.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..arch import arch_for, decoder_layers
from ..auto import load_model
from ..calibration import resolve_calibration
from ..errors import UsageError
from ..io import atomic_dir, prepare_out
from . import algorithm
from .config import LayerPruneConfig, WeightPruneConfig

__all__ = ["prune", "layer_scores", "remove_layers", "prune_weights", "save_pruned"]

logger = logging.getLogger(__name__)


def _hidden_input(args, kwargs) -> torch.Tensor:
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


@torch.no_grad()
def layer_scores(model: nn.Module, calib: torch.Tensor, batch_size: int = 4, progress: bool = True) -> torch.Tensor:
    """Mean cosine similarity between every pair of layer boundaries over the calibration tokens:
    [L + 1, L + 1], index 0 = the input of layer 0, index l + 1 = the output of layer l."""
    layers = decoder_layers(model)
    states: list[torch.Tensor] = []

    def grab_input(module, args, kwargs):
        if not states:
            states.append(_hidden_input(args, kwargs).flatten(0, -2).float())

    def grab_output(module, args, kwargs, output):
        out = output[0] if isinstance(output, tuple) else output
        states.append(out.flatten(0, -2).float())

    handles = [layers[0].register_forward_pre_hook(grab_input, with_kwargs=True)]
    handles += [layer.register_forward_hook(grab_output, with_kwargs=True) for layer in layers]
    total, tokens = None, 0
    device = next(model.parameters()).device
    try:
        for i in tqdm(range(0, len(calib), batch_size), desc="layer scores", unit="batch", disable=not progress):
            states.clear()
            ids = calib[i:i + batch_size].to(device)
            model(ids, use_cache=False)
            sums = algorithm.cosine_sums(states)
            total = sums if total is None else total + sums
            tokens += ids.numel()
    finally:
        for h in handles:
            h.remove()
    return total / tokens


def remove_layers(model: nn.Module, drop: list[int]) -> nn.Module:
    """Remove decoder layers `drop` in place: the ModuleList, `num_hidden_layers`, every per-layer
    list in the config (`layer_types`, ...) and the layers' `layer_idx` (so the KV cache lines up)."""
    spec = arch_for(model)
    layers = decoder_layers(model, spec)
    n = len(layers)
    keep = [i for i in range(n) if i not in set(drop)]
    if not keep:
        raise UsageError(f"removing {len(drop)} of {n} decoder layers leaves none; remove at most {n - 1}")
    parent_name, _, child = spec.layers.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, nn.ModuleList([layers[i] for i in keep]))
    for new_index, layer in enumerate(getattr(parent, child)):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    config = model.config
    for key, value in list(vars(config).items()):
        if isinstance(value, (list, tuple)) and len(value) == n and key != "architectures":
            setattr(config, key, type(value)(value[i] for i in keep))
    config.num_hidden_layers = len(keep)
    return model


@contextlib.contextmanager
def layers_removed(model: nn.Module, drop: list[int]):
    """`remove_layers` for the duration of a block, then the model exactly as it was."""
    spec = arch_for(model)
    parent_name, _, child = spec.layers.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    saved_layers, saved_config = getattr(parent, child), dict(vars(model.config))
    saved_idx = [(m, m.layer_idx) for m in saved_layers.modules() if hasattr(m, "layer_idx")]
    remove_layers(model, drop)
    try:
        yield model
    finally:
        setattr(parent, child, saved_layers)
        vars(model.config).clear()
        vars(model.config).update(saved_config)
        for module, index in saved_idx:
            module.layer_idx = index


@torch.no_grad()
def calibration_nll(model: nn.Module, calib: torch.Tensor, batch_size: int = 4) -> float:
    """Mean next-token NLL (nats) of `model` over the tokens of the windows `calib` [n, seqlen]."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(calib), batch_size):
        ids = calib[i:i + batch_size].to(device)
        logits = model(ids, use_cache=False).logits[:, :-1].float()
        total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                   reduction="sum").item()
        count += ids[:, 1:].numel()
    return total / count


MEASURE_WINDOWS = 8  # calibration windows on which each candidate removal is measured (paired: same tokens)
WARN_PPL_RATIO = 3.0  # a chosen removal whose calibration perplexity grows past this is reported loudly


def measured_choice(model: nn.Module, candidates: list[tuple[list[int], float]], calib: torch.Tensor,
                    progress: bool = True) -> dict:
    """Measure the calibration perplexity of the model without each candidate's layers and pick
    the lowest: the proxy ranks, the measurement decides. Returns the record of the choice."""
    sample = calib[:MEASURE_WINDOWS]
    base = calibration_nll(model, sample)
    rows = []
    for layers, proxy in tqdm(candidates, desc="measure removals", unit="candidate", disable=not progress):
        with layers_removed(model, layers):
            rows.append({"layers": layers, "proxy": None if math.isnan(proxy) else round(proxy, 6),
                         "calib_ppl": round(math.exp(calibration_nll(model, sample)), 4)})
    best = min(range(len(rows)), key=lambda r: (rows[r]["calib_ppl"], r))
    record = {"calib_ppl_original": round(math.exp(base), 4), "measured_on": list(sample.shape),
              "candidates": rows, "chosen": best}
    ratio = rows[best]["calib_ppl"] / record["calib_ppl_original"]
    if best:
        logger.info("the proxy's best removal %s measures calibration ppl %.3f; %s measures %.3f: taking it",
                    rows[0]["layers"], rows[0]["calib_ppl"], rows[best]["layers"], rows[best]["calib_ppl"])
    if ratio > WARN_PPL_RATIO:
        logger.warning("removing layers %s raises calibration perplexity %.1fx (%.2f -> %.2f): the pruned model may "
                       "be broken; remove fewer layers, or heal it", rows[best]["layers"], ratio,
                       record["calib_ppl_original"], rows[best]["calib_ppl"])
    return record


@torch.no_grad()
def _input_norms(model: nn.Module, calib: torch.Tensor, linears: dict[str, nn.Linear], batch_size: int,
                 progress: bool) -> dict[str, torch.Tensor]:
    """Per linear, the L2 norm over calibration tokens of each input channel: [in] fp32."""
    sq = {name: torch.zeros(m.in_features, dtype=torch.float64) for name, m in linears.items()}

    def hook(name):
        def fn(module, args):
            sq[name] += args[0].detach().double().pow(2).flatten(0, -2).sum(0).cpu()
        return fn

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in linears.items()]
    device = next(model.parameters()).device
    try:
        for i in tqdm(range(0, len(calib), batch_size), desc="activation norms", unit="batch", disable=not progress):
            model(calib[i:i + batch_size].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {name: s.sqrt().float() for name, s in sq.items()}


def _decoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    spec = arch_for(model)
    return {f"{spec.layers}.{i}.{name}": m for i, layer in enumerate(decoder_layers(model, spec))
            for name, m in layer.named_modules() if isinstance(m, nn.Linear)}


@torch.no_grad()
def prune_weights(model: nn.Module, config: WeightPruneConfig, calib: torch.Tensor | None, batch_size: int = 4,
                  progress: bool = True) -> dict[str, tuple[int, int]]:
    """Zero weights of every decoder linear in place. Returns (zeros, weights) per linear."""
    linears = _decoder_linears(model)
    if config.pattern == "2:4":
        bad = [(n, m.in_features) for n, m in linears.items() if m.in_features % 4]
        if bad:
            raise UsageError(f"2:4 sparsity needs widths divisible by 4; {bad[0][0]} has {bad[0][1]} inputs")
    norms = _input_norms(model, calib, linears, batch_size, progress) if config.score == "wanda" else {}

    def score(name: str, m: nn.Linear) -> torch.Tensor:
        s = m.weight.detach().float().abs()
        return s * norms[name].to(s.device) if norms else s

    threshold = None
    if config.scope == "global" and config.pattern == "unstructured" and config.sparsity > 0:
        flat = torch.cat([score(n, m).flatten() for n, m in linears.items()])
        threshold = float(flat.kthvalue(max(1, int(len(flat) * config.sparsity))).values)
        del flat
    reached = {}
    for name, m in linears.items():
        keep = algorithm.prune_mask(score(name, m), config.sparsity, config.pattern, threshold)
        m.weight.mul_(keep.to(m.weight.dtype))
        reached[name] = (int((~keep).sum()), keep.numel())
    return reached


def prune(model, config: LayerPruneConfig | WeightPruneConfig, calibration: str | torch.Tensor | None = None,
          tokenizer=None, nsamples: int = 64, seqlen: int = 512, seed: int = 0, progress: bool = True):
    """Prune `model` in place with `config` and return it (a normal transformers model).

    Args:
        model: a loaded causal LM, or a packaged name / folder / Hub id (loaded in fp32).
        config: LayerPruneConfig (remove decoder layers) or WeightPruneConfig (zero weights).
        calibration: None for the wiki calibration half, a .txt/.jsonl path, or [n, seqlen] ids.
        tokenizer: the model's tokenizer (found from the name when `model` is one).
        nsamples, seqlen, seed: calibration windows drawn from the text.
    Returns:
        The pruned model; `model.config.llmshrink_prune` records the config, the scores and the
        layers removed (saved into config.json by save_pretrained).
    """
    if isinstance(model, (str, os.PathLike)):
        model, tokenizer, _ = load_model(str(model))
    if not isinstance(config, (LayerPruneConfig, WeightPruneConfig)):
        raise UsageError(f"prune takes a LayerPruneConfig or WeightPruneConfig, not {type(config).__name__}")
    if isinstance(config, WeightPruneConfig) and config.gradual():
        raise UsageError(f"rounds={config.rounds}, heal_steps={config.heal_steps} heal between rounds, which needs "
                         "folders; use llmshrink.prune.gradual_prune(source, config, out), llmshrink.compress or "
                         "`llmshrink prune --rounds`")
    n_layers = len(decoder_layers(model))
    if isinstance(config, LayerPruneConfig) and config.layers >= n_layers:
        raise UsageError(f"removing {config.layers} of {n_layers} decoder layers leaves none; remove at most {n_layers - 1}")
    calib = resolve_calibration(tokenizer, calibration, nsamples, seqlen, seed)[0] if config.needs_calibration() else None
    model.eval()
    record: dict = {"config": config.to_dict()}
    if isinstance(config, LayerPruneConfig):
        cos = layer_scores(model, calib, progress=progress) if calib is not None else None
        if cos is None:  # `last` needs no data
            drop = list(range(n_layers - config.layers, n_layers))
        else:
            candidates = algorithm.removal_candidates(config.criterion, cos, config.layers, config.candidates)
            record["block_influence"] = [round(v, 6) for v in algorithm.block_influence(cos).tolist()]
            record["angular"] = [round(v, 6) for v in algorithm.angular_distance(cos, config.layers).tolist()]
            record["measured"] = measured_choice(model, candidates, calib, progress=progress)
            drop = candidates[record["measured"]["chosen"]][0]
        remove_layers(model, drop)
        record["removed"] = drop
        logger.info("removed decoder layers %s (%s)", drop, config.criterion)
    else:
        reached = prune_weights(model, config, calib, progress=progress)
        record["sparsity"] = round(sum(z for z, _ in reached.values()) / max(sum(n for _, n in reached.values()), 1), 6)
    model.config.llmshrink_prune = record
    return model


def save_pruned(model: nn.Module, tokenizer, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """save_pretrained (safetensors) + tokenizer, into a temp folder renamed into place."""
    out = prepare_out(out, overwrite)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out
