"""Low-rank factorization, registered: a dense model in; a factorized folder out, or with `merge`
a dense model of the original shape."""

from __future__ import annotations

from pathlib import Path

from ..auto import load_model
from ..cliargs import add_method_command
from ..methods import Context, Method, register
from . import format as _format  # noqa: F401  (registers the factorized format)
from .apply import RECORD, factorize
from .config import FactorizeConfig
from .format import save_factorized
from .hf import register_with_transformers

__all__ = ["FACTORIZE"]

register_with_transformers()


def run(source: str, config: FactorizeConfig, out: Path, context: Context) -> None:
    model, tokenizer, _ = load_model(source)
    factorize(model, config, tokenizer=tokenizer, seed=context.seed, progress=context.progress,
              **context.calibration_kwargs())
    save_factorized(model, tokenizer, out)


def add_cli(subparsers) -> None:
    add_method_command(subparsers, FACTORIZE, "factorize",
                       "replace decoder linears by two thin ones (W ~ U V), truncated in the calibration inputs' "
                       "whitened space, ranks chosen across the model for --ratio of their parameters")


def output(config: FactorizeConfig) -> str:
    return "dense" if config.merge else "factorized"


FACTORIZE = register(Method(config=FactorizeConfig, run=run, output=output,
                            needs_calibration=FactorizeConfig.needs_calibration, headline=("ratio", "allocate"),
                            hub_tags=("low-rank",), record=RECORD, add_cli=add_cli))
