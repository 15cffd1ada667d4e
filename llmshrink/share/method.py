"""Weight sharing, registered: a dense model in (a weight-pruned one is dense with zeros, which
sharing keeps); a shared folder out, which only pack may follow."""

from __future__ import annotations

from pathlib import Path

from ..auto import load_model
from ..cliargs import add_method_command
from ..methods import Context, Method, register
from . import format as _format  # noqa: F401  (registers the shared format)
from .apply import RECORD, share
from .config import ShareConfig
from .format import save_shared
from .hf import register_with_transformers

__all__ = ["SHARE"]

register_with_transformers()


def run(source: str, config: ShareConfig, out: Path, context: Context) -> None:
    model, tokenizer, _ = load_model(source)
    share(model, config, tokenizer=tokenizer, seed=context.seed, progress=context.progress,
          **context.calibration_kwargs())
    save_shared(model, tokenizer, out)


def add_cli(subparsers) -> None:
    add_method_command(subparsers, SHARE, "share",
                       "cluster each decoder linear's weights into 2^bits shared values (k-means, weighted by the "
                       "calibration inputs' second moment), stored as codes and fp16 codebooks")


SHARE = register(Method(config=ShareConfig, run=run, output="shared", accepts=("dense",),
                        needs_calibration=ShareConfig.needs_calibration, headline=("bits", "per", "weighted"),
                        hub_tags=("weight-sharing",), record=RECORD, add_cli=add_cli))
