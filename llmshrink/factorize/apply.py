"""`llmshrink.factorize.factorize`: measure every chosen decoder linear's error-vs-rank curve on
calibration inputs, choose the ranks for the budget, then replace the linears by their factors.

Two walks over the decoder, one layer at a time (only one layer's inputs, outputs and second
moments are held): the first collects each linear's whitened singular values (its output error
at every rank), `allocate.py` turns them into ranks, and the second recomputes each layer's
second moments and swaps in the factors. With `sequential` (the default) the second walk feeds
each factorized layer's outputs to the next, so later layers are whitened by the inputs they will
see (one more layer forward per layer; measured better on the packaged model, see the config);
without it both walks see the original model's activations. The ranks come from the first walk
either way. The math is `whiten.py`.
"""

from __future__ import annotations

import logging
import re
import time
import torch
from torch import nn

from ..arch import arch_for, decoder_layers, layer_linears
from ..calibration import check_seqlen, resolve_calibration
from ..errors import UsageError
from ..gptq.passes import walk_layers
from .allocate import allocate_ranks, allocation_cost, check_budget, dense_cost, uniform_ranks
from .config import FactorizeConfig
from .modules import FactorizedLinear, set_module
from .whiten import truncate, truncation_errors, whitened_spectrum, whitened_svd, whitening

__all__ = ["RECORD", "chosen_linears", "factorize"]

logger = logging.getLogger(__name__)

RECORD = "llmshrink_factorize"  # the config.json key of a factorized (or merged) folder


def chosen_linears(model: nn.Module, config: FactorizeConfig) -> list[list[list[tuple[str, nn.Linear]]]]:
    """Per decoder layer, its steps (linears that read the same input) of the linears `targets`
    finds, as (name in the model, module)."""
    spec = arch_for(model)
    pattern = re.compile(config.targets)
    chosen = []
    for i, layer in enumerate(decoder_layers(model, spec)):
        steps = [[(f"{spec.layers}.{i}.{n}", m) for n, m in step if pattern.search(f"{spec.layers}.{i}.{n}")]
                 for step in layer_linears(layer, spec)]
        chosen.append([s for s in steps if s])
    if not any(chosen):
        raise UsageError(f"targets='{config.targets}' finds none of the decoder linears (such as "
                         f"{spec.layers}.0.{spec.sequential[0][0]}); use a pattern that does, or '' for all")
    return chosen


def _svds(steps, moments: dict, damp: float, values_only: bool = False):
    """(name, module, whitened SVD, or only its singular values) of each linear of a layer; one
    whitening per shared input."""
    for step in steps:
        H = moments[step[0][0]]
        whitener = None if H is None else whitening(H, damp)
        for name, module in step:
            W = module.weight.detach()
            yield name, module, whitened_spectrum(W, whitener) if values_only else whitened_svd(W, whitener)


def factorize(model: nn.Module, config: FactorizeConfig, calibration: str | torch.Tensor | None = None,
              tokenizer=None, nsamples: int = 128, seqlen: int = 512, seed: int = 0, progress: bool = True) -> dict:
    """Factorize `model`'s chosen decoder linears in place (FactorizedLinear modules, or dense
    U @ V with `merge`).

    Args:
        calibration: None (the wiki calibration half), a .txt/.jsonl path, or [n, seqlen] token ids;
            read only with `whiten`.
        tokenizer: the model's tokenizer, to cut calibration text.
    Returns:
        The record (also set as `model.config.llmshrink_factorize`): ranks, the linears kept
        dense, parameters before and after, each linear's relative output error.
    """
    chosen = chosen_linears(model, config)
    shapes = {name: (m.out_features, m.in_features) for steps in chosen for step in steps for name, m in step}
    check_budget(shapes, config.ratio)  # a ratio no allocation can meet fails before any work
    calib, calib_info = None, None
    if config.whiten:
        check_seqlen(model.config, seqlen if not isinstance(calibration, torch.Tensor) else calibration.shape[1])
        calib, calib_info = resolve_calibration(tokenizer, calibration, nsamples, seqlen, seed)
    started = time.perf_counter()
    if config.allocate == "uniform":
        ranks = uniform_ranks(shapes, config.ratio)
    else:
        errors: dict[str, torch.Tensor] = {}

        def measure(i, steps, moments):
            for name, _, sigma in _svds(steps, moments, config.damp, values_only=True):
                err = truncation_errors(sigma)
                errors[name] = err / err[0] if config.relative and err[0] > 0 else err

        walk_layers(model, calib, chosen, measure, sequential=False, progress=progress, desc="factorize: spectra")
        ranks = allocate_ranks(errors, shapes, config.ratio)
    relative: dict[str, float] = {}

    def replace(i, steps, moments):
        keep = [[(n, m) for n, m in step if ranks[n] is not None] for step in steps]
        for name, module, (P, sigma, B) in _svds([s for s in keep if s], moments, config.damp):
            U, V = truncate(P, sigma, B, ranks[name])
            bias = None if module.bias is None else module.bias.detach()
            factored = FactorizedLinear.from_factors(U, V, bias, dtype=module.weight.dtype)
            total = float((sigma.double() ** 2).sum())
            relative[name] = round(float(truncation_errors(sigma)[ranks[name]]) / total, 6) if total > 0 else 0.0
            set_module(model, name, factored.merged() if config.merge else factored)

    walk_layers(model, calib, chosen, replace, sequential=config.sequential, progress=progress, desc="factorize")
    kept = allocation_cost(ranks, shapes)
    total = sum(dense_cost(s) for s in shapes.values())
    record = {"config": config.to_dict(), "merged": config.merge,
              "ranks": {n: r for n, r in ranks.items() if r is not None},
              "dense": [n for n, r in ranks.items() if r is None],
              "parameters": {"dense": total, "kept": kept, "ratio": round(kept / total, 6)},
              "relative_error": relative, "calibration": calib_info}
    logger.info("factorized %d of %d linears to %.4f of their parameters in %.1f s", len(record["ranks"]),
                len(shapes), kept / total, time.perf_counter() - started)
    model.config.llmshrink_factorize = record
    return record
