"""`llmshrink.factorize.factorize`: measure every chosen decoder linear's error-vs-rank curve on
calibration inputs, choose the ranks for the budget, then replace the linears by their factors.
Or, in two parts: `save_score_map` measures everything once (scores.py), and a cut from the map
(`scores`) chooses the ranks for any ratio and slices the stored factors, without calibration.

Two walks over the decoder, one layer at a time (only one layer's inputs, outputs and second
moments are held): the first collects each linear's whitened singular values (its output error
at every rank), `allocate.py` turns them into ranks, and the second recomputes each layer's
second moments and swaps in the factors. With `sequential` (the default) the second walk feeds
each factorized layer's outputs to the next, so later layers are whitened by the inputs they will
see (one more layer forward per layer; measured better on the packaged model, see the config);
without it both walks see the original model's activations. The ranks come from the first walk
either way. A score map is one walk without `sequential` (the cut is not known yet): every layer
is whitened by the original model's inputs, so a cut equals a run without `sequential` at the
same ratio. The math is `whiten.py`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..arch import arch_for, decoder_steps
from ..calibration import check_seqlen, resolve_calibration
from ..errors import UsageError
from ..gptq.passes import walk_layers
from ..io import atomic_dir, prepare_out
from .allocate import allocate_ranks, allocation_cost, check_budget, dense_cost, uniform_ranks
from .config import FactorizeConfig
from .modules import FactorizedLinear, set_module
from .scores import ScoreMap, check_scores, check_source, read_scores, source_identity, write_layer, write_meta
from .whiten import direction_importance, error_curve, truncate, whitened_spectrum, whitened_svd, whitening

__all__ = ["RECORD", "chosen_linears", "factorize", "linear_shapes", "save_score_map"]

logger = logging.getLogger(__name__)

RECORD = "llmshrink_factorize"  # the config.json key of a factorized (or merged) folder


def chosen_linears(model: nn.Module, config: FactorizeConfig) -> list[list[list[tuple[str, nn.Linear]]]]:
    """Per decoder layer, its steps (linears that read the same input) of the linears `targets`
    finds, as (name in the model, module)."""
    pattern = re.compile(config.targets)
    chosen = [[kept for kept in ([(n, m) for n, m in step if pattern.search(n)] for step in steps) if kept]
              for steps in decoder_steps(model)]
    if not any(chosen):
        spec = arch_for(model)
        raise UsageError(f"targets='{config.targets}' finds none of the decoder linears (such as "
                         f"{spec.layers}.0.{spec.sequential[0][0]}); use a pattern that does, or '' for all")
    return chosen


def linear_shapes(chosen) -> dict[str, tuple[int, int]]:
    """name -> (out, in) of the chosen linears."""
    return {name: (m.out_features, m.in_features) for steps in chosen for step in steps for name, m in step}


def _svds(steps, moments: dict, damp: float, values_only: bool = False):
    """(name, module, whitened SVD, or only its singular values) of each linear of a layer; one
    whitening per shared input."""
    for step in steps:
        H = moments[step[0][0]]
        whitener = None if H is None else whitening(H, damp)
        for name, module in step:
            W = module.weight.detach()
            yield name, module, whitened_spectrum(W, whitener) if values_only else whitened_svd(W, whitener)


def _calibration(model, config: FactorizeConfig, calibration, tokenizer, nsamples: int, seqlen: int, seed: int):
    """(windows, their record), or (None, None) without `whiten`."""
    if not config.whiten:
        return None, None
    check_seqlen(model.config, seqlen if not isinstance(calibration, torch.Tensor) else calibration.shape[1])
    return resolve_calibration(tokenizer, calibration, nsamples, seqlen, seed)


def _ranks(config: FactorizeConfig, shapes: dict, curves: Callable[[], dict[str, torch.Tensor]]) -> dict:
    """The ranks for `config.ratio`: uniform, or allocated from the error curves `curves()` gives."""
    if config.allocate == "uniform":
        return uniform_ranks(shapes, config.ratio)
    return allocate_ranks(curves(), shapes, config.ratio)


def _swap(model: nn.Module, name: str, module: nn.Linear, U: torch.Tensor, V: torch.Tensor, merge: bool) -> None:
    """Put the factors U [out, rank], V [rank, in] (and the linear's bias) in place of `module`."""
    bias = None if module.bias is None else module.bias.detach()
    factored = FactorizedLinear.from_factors(U, V, bias, dtype=module.weight.dtype)
    set_module(model, name, factored.merged() if merge else factored)


def _record(model: nn.Module, config: FactorizeConfig, ranks: dict, shapes: dict, relative: dict,
            calib_info: dict | None, started: float, scores: str | None = None) -> dict:
    """The record of a factorized model (also set as `model.config.llmshrink_factorize`)."""
    kept = allocation_cost(ranks, shapes)
    total = sum(dense_cost(s) for s in shapes.values())
    record = {"config": config.to_dict(), "merged": config.merge,
              "ranks": {n: r for n, r in ranks.items() if r is not None},
              "dense": [n for n, r in ranks.items() if r is None],
              "parameters": {"dense": total, "kept": kept, "ratio": round(kept / total, 6)},
              "relative_error": relative, "calibration": calib_info, "scores": scores}
    logger.info("factorized %d of %d linears to %.4f of their parameters in %.1f s%s", len(record["ranks"]),
                len(shapes), kept / total, time.perf_counter() - started, f" (cut from {scores})" if scores else "")
    model.config.llmshrink_factorize = record
    return record


def factorize(model: nn.Module, config: FactorizeConfig, calibration: str | torch.Tensor | None = None,
              tokenizer=None, nsamples: int = 128, seqlen: int = 512, seed: int = 0, progress: bool = True,
              source_sha256: str | None = None) -> dict:
    """Factorize `model`'s chosen decoder linears in place (FactorizedLinear modules, or dense
    U @ V with `merge`); with `save_scores` first write the score map and cut from it, with
    `scores` cut from an earlier map (no calibration read).

    Args:
        calibration: None (the wiki calibration half), a .txt/.jsonl path, or [n, seqlen] token ids;
            read only with `whiten`.
        tokenizer: the model's tokenizer, to cut calibration text.
        source_sha256: with `save_scores` or `scores`, the `tensors_sha256` of the folder `model`
            was loaded from (recorded in the map, or checked against it); None: computed from
            `model.name_or_path`.
    Returns:
        The record (also set as `model.config.llmshrink_factorize`): ranks, the linears kept
        dense, parameters before and after, each linear's relative output error.
    """
    chosen = chosen_linears(model, config)
    shapes = linear_shapes(chosen)
    check_budget(shapes, config.ratio)  # a ratio no allocation can meet fails before any work
    if config.save_scores:  # measure the map, then cut from it
        source_sha256 = source_identity(model, source_sha256)["sha256"]
        save_score_map(model, config, calibration=calibration, tokenizer=tokenizer, nsamples=nsamples, seqlen=seqlen,
                       seed=seed, progress=progress, source_sha256=source_sha256)
        config = dataclasses.replace(config, save_scores="", scores=config.save_scores)
    if config.scores:
        scores = read_scores(config.scores)
        check_scores(scores, config, shapes)
        check_source(scores, source_identity(model, source_sha256))
        return _cut(model, config, chosen, shapes, scores)
    calib, calib_info = _calibration(model, config, calibration, tokenizer, nsamples, seqlen, seed)
    started = time.perf_counter()

    def measure(i, steps, moments):
        for name, _, sigma in _svds(steps, moments, config.damp, values_only=True):
            errors[name] = error_curve(*direction_importance(sigma), relative=config.relative)

    errors: dict[str, torch.Tensor] = {}

    def curves():
        walk_layers(model, calib, chosen, measure, sequential=False, progress=progress, desc="factorize: spectra")
        return errors

    ranks = _ranks(config, shapes, curves)
    relative: dict[str, float] = {}

    def replace(i, steps, moments):
        keep = [[(n, m) for n, m in step if ranks[n] is not None] for step in steps]
        for name, module, (P, sigma, B) in _svds([s for s in keep if s], moments, config.damp):
            _swap(model, name, module, *truncate(P, sigma, B, ranks[name]), merge=config.merge)
            relative[name] = round(float(error_curve(*direction_importance(sigma))[ranks[name]]), 6)

    walk_layers(model, calib, chosen, replace, sequential=config.sequential, progress=progress, desc="factorize")
    return _record(model, config, ranks, shapes, relative, calib_info, started)


def _cut(model: nn.Module, config: FactorizeConfig, chosen, shapes: dict, scores: ScoreMap) -> dict:
    """Allocate the ranks from the map's importances and swap in its sliced factors."""
    started = time.perf_counter()
    ranks = _ranks(config, shapes, lambda: {n: scores.curve(n, config.relative) for n in shapes})
    relative: dict[str, float] = {}
    for name, module in [pair for steps in chosen for step in steps for pair in step]:
        if ranks[name] is not None:
            _swap(model, name, module, *scores.factors(name, ranks[name]), merge=config.merge)
            relative[name] = round(float(scores.curve(name)[ranks[name]]), 6)
    scores.index.release()
    return _record(model, config, ranks, shapes, relative, scores.meta["calibration"], started, str(scores.path))


def save_score_map(model: nn.Module, config: FactorizeConfig, out: str | os.PathLike | None = None,
                   calibration: str | torch.Tensor | None = None, tokenizer=None, nsamples: int = 128,
                   seqlen: int = 512, seed: int = 0, progress: bool = True, source_sha256: str | None = None,
                   overwrite: bool = False) -> Path:
    """Measure the score map of `model`'s chosen linears (scores.py) and write it to `out`
    (default `config.save_scores`), whole or not at all; the model is left as it is.

    One walk over the decoder, holding one layer's inputs: each linear's whitened SVD is cut at
    the largest rank that saves parameters and stored with every direction's importance. The walk
    is not sequential (the cut is not known yet): every layer is whitened by the full-precision
    model's own inputs, whatever `config.sequential` says.

    Args:
        calibration, tokenizer, nsamples, seqlen, seed: as `factorize`.
        source_sha256: the `tensors_sha256` of the folder `model` was loaded from, recorded for
            cuts to check; None: computed from `model.name_or_path`.
        overwrite: replace a non-empty `out` (else refused before any work).
    Returns:
        The map's folder.
    """
    if not (out or config.save_scores):
        raise UsageError("save_score_map needs out= or config.save_scores: the folder to write the score map to")
    out = prepare_out(out or config.save_scores, overwrite, flag="--save-scores")
    chosen = chosen_linears(model, config)
    source = source_identity(model, source_sha256)
    calib, calib_info = _calibration(model, config, calibration, tokenizer, nsamples, seqlen, seed)
    started = time.perf_counter()
    linears: dict[str, dict] = {}
    with atomic_dir(out) as tmp:
        def score(i, steps, moments):
            linears.update(write_layer(tmp, i, [(name, svd) for name, _, svd in _svds(steps, moments, config.damp)]))

        walk_layers(model, calib, chosen, score, sequential=False, progress=progress, desc="factorize: scores")
        write_meta(tmp, source, calib_info, config, linears)
    logger.info("score map of %d linears written to %s in %.1f s", len(linears), out, time.perf_counter() - started)
    return out
