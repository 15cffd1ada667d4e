"""Layer pruning and weight pruning, registered: both write a normal (dense) checkpoint."""

from __future__ import annotations

from pathlib import Path

from ..auto import load_model
from ..methods import Context, Method, register
from .apply import prune, save_pruned
from .cli import add_cli
from .config import LayerPruneConfig, WeightPruneConfig
from .gradual import gradual_prune

__all__ = ["LAYER_PRUNE", "WEIGHT_PRUNE"]


def run(source: str, config: LayerPruneConfig | WeightPruneConfig, out: Path, context: Context) -> None:
    if isinstance(config, WeightPruneConfig) and config.gradual():
        gradual_prune(source, config, out, seed=context.seed, progress=context.progress, overwrite=context.overwrite,
                      **context.calibration_kwargs())
        return
    model, tokenizer, _ = load_model(source)
    prune(model, config, tokenizer=tokenizer, seed=context.seed, progress=context.progress,
          **context.calibration_kwargs())
    save_pruned(model, tokenizer, out, overwrite=context.overwrite)


LAYER_PRUNE = register(Method(config=LayerPruneConfig, run=run, output="dense",
                              needs_calibration=LayerPruneConfig.needs_calibration, headline=("layers", "criterion"),
                              hub_tags=("pruned",), record="llmshrink_prune", changes_architecture=True,
                              add_cli=add_cli))
WEIGHT_PRUNE = register(Method(config=WeightPruneConfig, run=run, output="dense",
                               needs_calibration=WeightPruneConfig.needs_calibration,
                               headline=("sparsity", "score", "pattern"), hub_tags=("pruned",), record="llmshrink_prune"))
