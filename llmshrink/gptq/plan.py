"""`target_bits`: the per-linear widths of a mixed-precision checkpoint, planned before the walk.

The sensitivity is measured (sensitivity.py: a Fisher pass, then one layer-by-layer walk solving
every linear at every candidate width) or read back from an earlier run's mixed_precision.json;
mixed.py allocates the widths under the budget; the plan becomes the config's `dynamic` rules.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import Counter
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import UsageError
from ..safetensors_io import TensorIndex, tensors_sha256
from .config import GPTQConfig
from .mixed import CANDIDATE_BITS, allocate, average_bits, check_budget, plan_rules, stored_bits
from .passes import capture_first_inputs
from .sensitivity import layer_losses, output_fisher
from .source import all_linears, load_into

__all__ = ["CRITERION", "MIXED_FILE", "plan_mixed_precision"]

logger = logging.getLogger(__name__)

MIXED_FILE = "mixed_precision.json"
CRITERION = "fisher"  # which predicted loss the plan minimizes (bench/sensitivity.py measures both)


def plan_mixed_precision(source: Path, config: GPTQConfig, model, layers, spec, layer_prefix: str, index: TensorIndex,
                     key_of: dict, calib: torch.Tensor, dtype, calib_info: dict, sensitivity, progress: bool
                     ) -> tuple[GPTQConfig, dict]:
    """`config` with each decoder linear's bits chosen under `config.target_bits` (as `dynamic`
    rules), and the record saved as mixed_precision.json: the plan and the losses behind it."""
    linears = {name: (config.for_module(name), module) for name, module in all_linears(model, layers, spec,
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
        load_into(layers[i], prefix, index, key_of)
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
