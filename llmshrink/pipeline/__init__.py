"""Compression pipelines: `llmshrink run RECIPE.yaml` (see recipe.py for the file, run.py for the run
folder, report.py for the report)."""

import sys

from .recipe import Recipe, RecipeError, load_recipe, parse_recipe, plan_lines
from .report import print_summary
from .run import run_recipe

__all__ = ["Recipe", "RecipeError", "load_recipe", "parse_recipe", "plan_lines", "run_recipe"]


def _cmd_run(args) -> int:
    recipe = load_recipe(args.recipe, overrides=args.set or [])
    for line in plan_lines(recipe):
        print(line)
    if args.dry_run:
        print("dry run: the recipe is valid; nothing was run")
        return 0
    try:
        state = run_recipe(recipe, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
    except KeyboardInterrupt:
        print(f"llmshrink: interrupted; finished steps are kept in {recipe.out}: add --resume to carry on",
              file=sys.stderr)
        return 130
    print_summary(state)
    out = recipe.out
    print(f"final model: {out}/{state['final']}; report: {out}/report.md"
          + (f", {out}/pareto.png" if state.get("evals") else ""))
    return 0


def add_cli(subparsers) -> None:
    """Add the `run` sub-command to llmshrink's command line."""
    p = subparsers.add_parser("run", help="run a compression pipeline from a YAML recipe",
                              description="Run the steps of a recipe (prune, heal, quantize, delta, pack, ...), "
                                          "evaluate the original against the result, and write a report.")
    p.add_argument("recipe", help="the YAML recipe, e.g. recipes/quickstart.yaml")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set steps.0.bits=3 --set calibration.nsamples=8 "
                        "(repeatable; values are read as YAML)")
    p.add_argument("--resume", action="store_true", help="continue the run in the recipe's out folder after "
                                                         "its last finished step")
    p.add_argument("--dry-run", action="store_true", help="validate the recipe and print the plan; run nothing")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty out folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_run)
