"""Width pruning, registered: a dense model in, a dense model of the same type with smaller widths
out (so GPTQ, heal and pack can follow it; delta cannot, the architecture changed)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig
from transformers import AutoModelForCausalLM as HFAuto

from ..auto import load_model
from ..cliargs import add_method_command
from ..io import atomic_dir
from ..methods import Context, Method, register
from ..models import resolve_model
from .apply import RECORD, check_layout, plan_widths, width_prune
from .config import WidthPruneConfig

__all__ = ["WIDTH_PRUNE", "check_prunable"]


def check_prunable(resolved: str, config: WidthPruneConfig) -> None:
    """The layout and budget checks of `plan_widths` on the model's shapes alone (built on the meta
    device from its config, no weights read), so a bad ratio or model type fails before any work."""
    model_config = AutoConfig.from_pretrained(resolved)
    check_layout(model_config)
    with torch.device("meta"):
        plan_widths(HFAuto.from_config(model_config), config)


def run(source: str, config: WidthPruneConfig, out: Path, context: Context) -> None:
    resolved = resolve_model(source)
    check_prunable(resolved, config)
    model, tokenizer, _ = load_model(resolved)
    width_prune(model, config, tokenizer=tokenizer, seed=context.seed, progress=context.progress,
                **context.calibration_kwargs())
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)


def add_cli(subparsers) -> None:
    add_method_command(subparsers, WIDTH_PRUNE, "width_prune",
                       "remove MLP channels and attention heads (whole key/value groups) whose loss costs the least "
                       "output error on calibration text, refitting down_proj and o_proj, the same widths in every "
                       "layer, for --ratio of the parameters")


WIDTH_PRUNE = register(Method(config=WidthPruneConfig, run=run, output="dense", needs_calibration=True,
                              headline=("ratio", "targets"), hub_tags=("pruned",), record=RECORD,
                              changes_architecture=True, add_cli=add_cli))
