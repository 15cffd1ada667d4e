"""Fully fine-tune the default model on book text (LAMBADA passages) and save it.

    accelerate launch recipes/finetune.py --out finetuned/ [--steps 24 --lr 2e-4 ...]
    python recipes/finetune.py --out finetuned/            # one process, same code path
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 recipes/finetune.py ...  # 2 CPU processes

Without --out the fine-tune is built into (or reused from) the llmshrink cache, as
`llmshrink.finetune.finetuned_model()` does. Prints the domain perplexity before and after.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

from accelerate import PartialState

from llmshrink.errors import UsageError
from llmshrink.finetune import RECORD, FinetuneConfig, finetune, finetuned_model


def build_parser() -> argparse.ArgumentParser:
    d = FinetuneConfig()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="base model: packaged alias, folder or Hub id")
    p.add_argument("--out", type=Path, help="output folder (default: the llmshrink cache, reused if built)")
    p.add_argument("--small", action="store_true", help="start from FinetuneConfig.small() (the test config)")
    p.add_argument("--steps", type=int, help=f"optimizer steps ({d.steps})")
    p.add_argument("--seqlen", type=int, help=f"tokens per training window ({d.seqlen})")
    p.add_argument("--batch-size", type=int, help=f"windows per micro-batch over all processes ({d.batch_size})")
    p.add_argument("--grad-accum", type=int, help=f"micro-batches per optimizer step ({d.grad_accum})")
    p.add_argument("--lr", type=float, help=f"peak learning rate ({d.lr})")
    p.add_argument("--warmup", type=int, help=f"warmup steps ({d.warmup})")
    p.add_argument("--schedule", choices=("cosine", "linear"), help=f"decay after warmup ({d.schedule})")
    p.add_argument("--weight-decay", type=float, help=f"AdamW weight decay on matrices ({d.weight_decay})")
    p.add_argument("--mixed-precision", choices=("no", "bf16"), help=f"bf16 autocast or fp32 ({d.mixed_precision})")
    p.add_argument("--seed", type=int, help=f"seed of the training windows ({d.seed})")
    p.add_argument("--max-minutes", type=float, help="stop training after this many minutes")
    p.add_argument("--eval-seqlen", type=int, help=f"window of the domain perplexity ({d.eval_seqlen})")
    p.add_argument("--eval-windows", type=int,
                   help=f"windows of the domain perplexity, 0 for the whole eval text ({d.eval_windows})")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    config = FinetuneConfig.small() if args.small else FinetuneConfig()
    for field in dataclasses.fields(FinetuneConfig):
        value = getattr(args, field.name, None)
        if value is not None:
            setattr(config, field.name, value)
    if args.eval_windows == 0:
        config.eval_windows = None
    return config


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)
        if args.out is None:
            out = finetuned_model(config, base=args.model, progress=not args.no_progress)
        else:
            out = finetune(args.model, config, args.out, progress=not args.no_progress)
    except UsageError as e:
        print(f"finetune: error: {e}", file=sys.stderr)
        return 2
    record_path = out / RECORD
    if PartialState().is_main_process and record_path.is_file():
        record = json.loads(record_path.read_text())
        windows = record["domain"]["windows"] or "all"
        print(f"domain perplexity (LAMBADA eval passages, seqlen {record['domain']['seqlen']}, {windows} windows): "
              f"{record['domain_ppl_before']:.3f} before, {record['domain_ppl_after']:.3f} after "
              f"({record['steps_done']} steps, {record['train_seconds']:.0f} s on {record['num_processes']} process(es))")
        print(f"fine-tuned model: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
