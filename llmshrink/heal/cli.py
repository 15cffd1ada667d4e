"""`llmshrink heal`: its sub-command, whose options fill a HealConfig."""

from __future__ import annotations

import argparse
import dataclasses
import json

from ..errors import Interrupted
from ..train.checkpoint import STATE, checkpoint_dir
from .config import RECORD, HealConfig
from .merge import merge_adapter
from .run import heal

__all__ = ["add_cli", "config_from_args"]


def config_from_args(args: argparse.Namespace) -> HealConfig:
    """HealConfig from parsed arguments: every field whose option was given, defaults for the rest."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(HealConfig)
              if getattr(args, f.name, None) is not None}
    return HealConfig(**values)


def _cmd_heal(args: argparse.Namespace) -> int:
    if args.merge_adapter:
        out = merge_adapter(args.model, args.merge_adapter, args.out, overwrite=args.overwrite)
        print(f"adapter {args.merge_adapter} merged into {args.model}; checkpoint written to {out}")
        return 0
    config = config_from_args(args)
    try:
        out = heal(args.model, config, args.out, teacher=args.teacher, resume=args.resume, overwrite=args.overwrite,
                   progress=not args.no_progress)
    except KeyboardInterrupt:
        if (checkpoint_dir(args.out) / STATE).is_file():
            raise Interrupted(f"the last checkpoint is kept in {checkpoint_dir(args.out)}: run the same command with "
                              "--resume to continue from it, or delete it to discard it") from None
        raise
    if (out / RECORD).is_file():
        record = json.loads((out / RECORD).read_text())
        ppl = f"; held-out ppl {record['evals'][0]['ppl']:.2f} -> {record['evals'][-1]['ppl']:.2f}" \
            if record["evals"] else ""
        print(f"healed in {record['train_seconds']:.0f} s, loss {record['loss_first']:.3f} -> "
              f"{record['loss_last']:.3f}{ppl}; {'model' if config.writes_model else 'adapter'} written to {out}")
    return 0


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add the `heal` sub-command to llmshrink's command line."""
    d = HealConfig()
    p = subparsers.add_parser("heal", help="LoRA/QLoRA fine-tune of a pruned model, distilled from the original",
                              description="Heal a pruned model: LoRA or QLoRA on calibration text with cross-entropy, "
                                          "logit distillation from the teacher, or both.")
    p.add_argument("--model", required=True, help="the pruned model: folder (with tokenizer) or packaged name")
    p.add_argument("--teacher", help="the original model, for --loss kd or ce+kd (same tokenizer)")
    p.add_argument("--out", required=True, help="folder to write: the adapter, or with --merge the merged model")
    p.add_argument("--method", dest="adapter",
                   help=f"lora, qlora (NF4 base) or full (every weight trained; writes the model) (default {d.adapter})")
    p.add_argument("--loss", help=f"ce, kd or ce+kd (default {d.loss})")
    p.add_argument("--alpha", type=float, help=f"ce+kd: alpha * KD + (1 - alpha) * CE (default {d.alpha})")
    p.add_argument("--temperature", type=float, help=f"distillation temperature (default {d.temperature})")
    p.add_argument("--rank", type=int, help=f"LoRA rank (default {d.rank})")
    p.add_argument("--lora-alpha", type=int, help=f"LoRA alpha (default {d.lora_alpha})")
    p.add_argument("--lora-dropout", type=float, help=f"LoRA dropout (default {d.lora_dropout})")
    p.add_argument("--target-modules", help=f"peft target modules (default {d.target_modules})")
    p.add_argument("--steps", type=int, help=f"optimizer steps (default {d.steps})")
    p.add_argument("--seqlen", type=int, help=f"tokens per training window (default {d.seqlen})")
    p.add_argument("--batch-size", type=int, help=f"windows per step over all processes (default {d.batch_size})")
    p.add_argument("--grad-accum", type=int, help=f"micro-batches per step (default {d.grad_accum})")
    p.add_argument("--lr", type=float, help=f"peak learning rate (default {d.lr})")
    p.add_argument("--warmup", type=int, help=f"warmup steps (default {d.warmup})")
    p.add_argument("--schedule", help=f"cosine or linear decay (default {d.schedule})")
    p.add_argument("--calib-file", dest="calibration", help="local .txt/.jsonl training text (default: the wiki "
                                                             "calibration half)")
    p.add_argument("--nsamples", type=int, help=f"training windows drawn from the text (default {d.nsamples})")
    p.add_argument("--eval-every", type=int, help="held-out wiki perplexity every N steps (default 0: never)")
    p.add_argument("--save-every", type=int, help="checkpoint into OUT.checkpoint every N steps (default 0: never)")
    p.add_argument("--seed", type=int, help=f"seed of the windows and the LoRA init (default {d.seed})")
    p.add_argument("--max-minutes", type=float, help="stop after this much training time, the schedule unchanged "
                                                     "(default: none)")
    p.add_argument("--merge", action="store_true", default=None,
                   help="write the merged full model to OUT (the adapter goes to OUT/adapter)")
    p.add_argument("--keep-zeros", action="store_true", default=None,
                   help="with --method full: weights that are exactly zero stay zero (fine-tune a pruned model "
                        "and keep its sparsity)")
    p.add_argument("--resume", action="store_true", help="continue from OUT.checkpoint")
    p.add_argument("--adapter", dest="merge_adapter", metavar="FOLDER",
                   help="no training: merge this saved adapter into --model and write it to --out")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_heal)
