"""Low-rank factorization, registered: a dense model in; a factorized folder out, or with `merge`
a dense model of the original shape. With `save_scores` the run also writes a score map (the CLI:
only the map, without --out); with `scores` it cuts from one, without calibration."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from transformers import AutoConfig
from transformers import AutoModelForCausalLM as HFAuto

from ..auto import load_model, local_folder
from ..cliargs import add_method_command, calibration_from_args, config_from_args
from ..errors import UsageError
from ..io import prepare_out
from ..methods import Context, Method, register
from ..safetensors_io import tensors_sha256
from . import format as _format  # noqa: F401  (registers the factorized format)
from .allocate import check_budget
from .apply import RECORD, chosen_linears, factorize, linear_shapes, save_score_map
from .config import FactorizeConfig
from .format import save_factorized
from .hf import register_with_transformers
from .scores import check_scores, check_source, read_scores

__all__ = ["FACTORIZE", "score"]

register_with_transformers()


def _prepare(source: str, config: FactorizeConfig, out: Path | None, overwrite: bool) -> tuple[str, str | None]:
    """Every refusal that needs no weights, before any work: the linears `targets` finds and the
    budget (on the model built from its config on the meta device), the score map to cut from, the
    map folder to write; then the hash a map records or is checked against. Returns (the model's
    local folder, its tensors' sha256 or None where no map is involved)."""
    folder = local_folder(source)
    with torch.device("meta"):
        shapes = linear_shapes(chosen_linears(HFAuto.from_config(AutoConfig.from_pretrained(folder)), config))
    if out is not None:
        check_budget(shapes, config.ratio)
    if config.save_scores:
        maps = prepare_out(config.save_scores, overwrite, flag="--save-scores")
        if out is not None and maps.resolve() == Path(out).resolve():
            raise UsageError(f"save_scores and the output folder are both {out}; give the score map a folder of its own")
    if not (config.scores or config.save_scores):
        return folder, None
    scores = read_scores(config.scores) if config.scores else None
    if scores is not None:
        check_scores(scores, config, shapes)
    sha = tensors_sha256(folder)
    if scores is not None:
        check_source(scores, {"name": source, "sha256": sha})
    return folder, sha


def run(source: str, config: FactorizeConfig, out: Path, context: Context) -> None:
    folder, sha = _prepare(source, config, out, context.overwrite)
    model, tokenizer, _ = load_model(folder)
    if config.save_scores:
        save_score_map(model, config, seed=context.seed, progress=context.progress, source_sha256=sha,
                       overwrite=context.overwrite, tokenizer=tokenizer, **context.calibration_kwargs())
        config = dataclasses.replace(config, save_scores="", scores=config.save_scores)
    factorize(model, config, tokenizer=tokenizer, seed=context.seed, progress=context.progress, source_sha256=sha,
              **({} if config.scores else context.calibration_kwargs()))
    save_factorized(model, tokenizer, out)


def score(source: str, config: FactorizeConfig, context: Context) -> Path:
    """Write only the score map of `source` to `config.save_scores` (the CLI without --out)."""
    folder, sha = _prepare(source, config, None, context.overwrite)
    model, tokenizer, _ = load_model(folder)
    return save_score_map(model, config, seed=context.seed, progress=context.progress, source_sha256=sha,
                          overwrite=context.overwrite, tokenizer=tokenizer, **context.calibration_kwargs())


def add_cli(subparsers) -> None:
    p = add_method_command(subparsers, FACTORIZE, "factorize",
                           "replace decoder linears by two thin ones (W ~ U V), truncated in the calibration inputs' "
                           "whitened space, ranks chosen across the model for --ratio of their parameters; "
                           "--save-scores MAP measures once, --scores MAP then cuts any --ratio in seconds",
                           out_required=False, out_help="folder to write (leave it out with --save-scores to write "
                                                        "only the score map)")
    with_out = p.get_default("func")

    def cli(args) -> int:
        config = config_from_args(FactorizeConfig, args)
        if config.scores and args.calib_file:
            raise UsageError(f"--scores {config.scores} cuts from the map's stored factors and reads no calibration "
                             "text; drop --calib-file (the map was calibrated when it was scored)")
        if args.out is not None or not config.save_scores:
            return with_out(args)
        context = Context(calibration=calibration_from_args(args), seed=args.seed, overwrite=args.overwrite)
        print(f"factorize score map written to {score(args.model, config, context)}")
        return 0

    p.set_defaults(func=cli)


def output(config: FactorizeConfig, input_kind: str = "dense") -> str:
    return "dense" if config.merge else "factorized"


FACTORIZE = register(Method(config=FactorizeConfig, run=run, output=output,
                            needs_calibration=FactorizeConfig.needs_calibration, headline=("ratio", "allocate"),
                            hub_tags=("low-rank",), record=RECORD, add_cli=add_cli))
