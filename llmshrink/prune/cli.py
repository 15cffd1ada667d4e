"""`llmshrink prune`: remove decoder layers (--layers N) or zero weights (--sparsity S). Defaults
are the configs'."""

from __future__ import annotations

import argparse
import json

from transformers import AutoConfig

from ..auto import load_model
from ..calibration import check_seqlen
from ..cliargs import add_run_flags, field_default, positive_int
from ..errors import UsageError
from ..io import check_writable_file, prepare_out
from ..models import DEFAULT_MODEL, resolve_model
from .apply import prune, save_pruned
from .config import CRITERIA, HEAL_LR, HEAL_METHODS, PATTERNS, SCHEDULES, SCORES, LayerPruneConfig, WeightPruneConfig
from .gradual import gradual_prune
from .report import plot_scores, print_scores

__all__ = ["add_cli"]


def _cmd_prune(args: argparse.Namespace) -> int:
    if (args.layers is None) == (args.sparsity is None):
        raise UsageError("give --layers N (remove decoder layers) or --sparsity S (zero weights), not both or neither")
    if args.layers is not None:
        config = LayerPruneConfig(layers=args.layers, criterion=args.criterion, candidates=args.candidates)
    else:
        config = WeightPruneConfig(sparsity=args.sparsity, score=args.score, pattern=args.pattern, scope=args.scope,
                                   rounds=args.rounds, heal_steps=args.heal_steps, schedule=args.schedule,
                                   rewind=args.rewind, heal_method=args.heal_method,
                                   heal_lr=args.heal_lr)
        config.validate()
    gradual = args.sparsity is not None and config.gradual()
    if args.layers is not None and (args.rounds != 1 or args.heal_steps or args.rewind):
        raise UsageError("--rounds, --heal-steps and --rewind schedule weight pruning; use them with --sparsity, "
                         "or heal removed layers with `llmshrink heal`")
    out = prepare_out(args.out, args.overwrite)
    plot = check_writable_file(args.plot, flag="--plot") if args.plot else out.with_name(out.name + "-scores.png")
    resolved = resolve_model(args.model)
    model_config = AutoConfig.from_pretrained(resolved, trust_remote_code=False)  # checks before the load
    n_layers = getattr(model_config, "num_hidden_layers", None)
    if args.layers is not None and n_layers is not None and args.layers >= n_layers:
        raise UsageError(f"removing {args.layers} of {n_layers} decoder layers leaves none; remove at most {n_layers - 1}")
    check_seqlen(model_config, args.calib_seqlen)
    if gradual:
        gradual_prune(resolved, config, out, calibration=args.calib_file, nsamples=args.nsamples,
                      seqlen=args.calib_seqlen, seed=args.seed, overwrite=args.overwrite)
        rounds = json.loads((out / "config.json").read_text())["llmshrink_prune"]["rounds"]
        path = " -> ".join(f"{r['sparsity']:.3f}" for r in rounds)
        print(f"pruned {resolved} in {len(rounds)} round(s): sparsity {path}, {config.heal_steps} healing steps; "
              f"checkpoint written to {out}")
        return 0
    model, tokenizer, resolved = load_model(resolved)
    prune(model, config, calibration=args.calib_file, tokenizer=tokenizer, nsamples=args.nsamples,
          seqlen=args.calib_seqlen, seed=args.seed)
    record = model.config.llmshrink_prune
    if args.layers is not None and "block_influence" in record:
        print_scores(record)
        plot = plot_scores(record, plot)
        print(f"score chart written to {plot}")
    save_pruned(model, tokenizer, out, overwrite=args.overwrite)
    what = (f"removed layers {record['removed']}" if args.layers is not None
            else f"sparsity {record['sparsity']:.3f}")
    print(f"pruned {resolved}: {what}; checkpoint written to {out}")
    return 0


def add_cli(subparsers) -> None:
    """Add the `prune` sub-command (both pruning methods)."""
    layer = lambda name: field_default(LayerPruneConfig, name)  # noqa: E731
    weight = lambda name: field_default(WeightPruneConfig, name)  # noqa: E731
    p = subparsers.add_parser("prune", help="remove decoder layers or zero weights, chosen on calibration text",
                              description="Layer pruning (--layers N) or weight pruning (--sparsity S) into a "
                                          "normal checkpoint.")
    p.add_argument("--model", default=None, help=f"packaged name, local folder or Hub id (default {DEFAULT_MODEL})")
    p.add_argument("--out", required=True, help="checkpoint folder to write")
    p.add_argument("--layers", type=positive_int, help="decoder layers to remove")
    p.add_argument("--criterion", default=layer("criterion"), choices=CRITERIA)
    p.add_argument("--candidates", type=positive_int, default=layer("candidates"),
                   help="measure the criterion's best N removals on calibration text and take the best measured "
                        f"(default {layer('candidates')}; 1: the criterion's choice)")
    p.add_argument("--plot", help="bar chart of the layer scores (default OUT-scores.png beside --out)")
    p.add_argument("--sparsity", type=float, help="share of decoder-linear weights to zero, in [0, 1)")
    p.add_argument("--score", default=weight("score"), choices=SCORES)
    p.add_argument("--pattern", default=weight("pattern"), choices=PATTERNS)
    p.add_argument("--scope", default=weight("scope"), choices=("layer", "global"))
    p.add_argument("--rounds", type=positive_int, default=weight("rounds"),
                   help="reach --sparsity in N prune -> heal rounds (gradual pruning; default 1: one-shot)")
    p.add_argument("--heal-steps", type=int, default=weight("heal_steps"),
                   help="healing steps in all (CE + KD, the input model as teacher), split over the rounds "
                        "(default 0: none)")
    p.add_argument("--schedule", default=weight("schedule"), choices=SCHEDULES,
                   help="sparsity after each round (default cubic: most of it early)")
    p.add_argument("--rewind", action="store_true",
                   help="lottery-ticket rewinding: the surviving weights go back to the input's values before "
                        "each round's healing")
    p.add_argument("--heal-method", default=weight("heal_method"), choices=HEAL_METHODS,
                   help="lora: an adapter merged after each round (the zeros restored after); full: sparse "
                        "fine-tuning, every surviving weight trained, the pruned ones held at zero "
                        f"(default {weight('heal_method')})")
    p.add_argument("--heal-lr", type=float, default=weight("heal_lr"),
                   help="the healing's peak learning rate (default " +
                        ", ".join(f"{v:g} for {k}" for k, v in HEAL_LR.items()) + ")")
    add_run_flags(p, nsamples=64, seqlen=512)
    p.set_defaults(func=_cmd_prune)
