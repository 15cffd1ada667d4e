"""`llmshrink delta compress`: a fine-tune as a compressed difference from its base. Defaults are
DeltaConfig's."""

from __future__ import annotations

import argparse
import time

from ..cliargs import Parser, add_run_flags, field_default, ints
from ..io import folder_size
from .compress import compress_delta
from .codecs import CODECS
from .config import DeltaConfig

__all__ = ["add_cli"]


def _cmd_delta_compress(args: argparse.Namespace) -> int:
    config = DeltaConfig(codec=args.method, scale_granularity=args.scale_granularity, distill_steps=args.distill_steps,
                         distill_lr=args.distill_lr, rank=args.rank, energy=args.energy, p=args.p,
                         mixed_ranks=args.mixed_ranks, mixed_bits=args.mixed_bits,
                         min_numel=args.min_numel, exact=tuple(args.exact), exact_dtype=args.exact_dtype,
                         exact_format=args.exact_format, seed=args.seed)
    started = time.perf_counter()
    out = compress_delta(args.base, args.finetuned, config, args.out, calibration=args.calib_file,
                         nsamples=args.nsamples, seqlen=args.calib_seqlen, revision=args.revision,
                         overwrite=args.overwrite)
    print(f"{config.codec} delta written to {out}: {folder_size(out) / 2**20:.1f} MiB "
          f"in {time.perf_counter() - started:.0f} s")
    return 0


def add_cli(subparsers) -> None:
    """Add the `delta` sub-command and its `compress` action."""
    d = lambda name: field_default(DeltaConfig, name)  # noqa: E731
    p = subparsers.add_parser("delta", help="store a fine-tune as a compressed difference from its base",
                              description="Delta compression of fine-tuned models.")
    delta = p.add_subparsers(dest="delta_command", metavar="ACTION", parser_class=Parser, required=True)
    p = delta.add_parser("compress", help="write a delta folder (loads with llmshrink.AutoModelForCausalLM)",
                         description="Compress FINETUNED as a delta from BASE; the folder records the base's hash.")
    p.add_argument("--base", required=True, help="the base model: packaged name, folder or cached Hub id")
    p.add_argument("--finetuned", required=True, help="the fine-tuned model (same architecture)")
    p.add_argument("--out", required=True, help="delta folder to write")
    p.add_argument("--method", choices=tuple(CODECS), default=d("codec"))
    p.add_argument("--scale-granularity", choices=("tensor", "row"), default=d("scale_granularity"),
                   help="bitdelta scales")
    p.add_argument("--distill-steps", type=int, default=d("distill_steps"),
                   help=f"bitdelta scale distillation steps (default {d('distill_steps')})")
    p.add_argument("--distill-lr", type=float, default=d("distill_lr"))
    p.add_argument("--rank", type=int, help="lowrank: fixed rank")
    p.add_argument("--energy", type=float, help="lowrank: keep this share of the delta's squared norm")
    p.add_argument("--p", type=float, default=d("p"), help=f"dare: share of delta entries dropped (default {d('p')})")
    p.add_argument("--mixed-ranks", type=ints, default=d("mixed_ranks"),
                   help="mixed: directions per band (default " + ",".join(map(str, d("mixed_ranks"))) + ")")
    p.add_argument("--mixed-bits", type=ints, default=d("mixed_bits"),
                   help="mixed: bits per band (default " + ",".join(map(str, d("mixed_bits"))) + ")")
    p.add_argument("--min-numel", type=int, default=d("min_numel"), help="smaller tensors are stored exactly")
    p.add_argument("--exact", action="append", default=[], metavar="GLOB", help="also store these tensors exactly")
    p.add_argument("--exact-dtype", choices=("float16", "bfloat16", "float32"), default=d("exact_dtype"))
    p.add_argument("--exact-format", choices=("delta", "full"), default=d("exact_format"))
    p.add_argument("--revision", help="the base's Hub revision, recorded in the delta")
    add_run_flags(p, nsamples=128, seqlen=256, text="distillation text, .txt/.jsonl")
    p.set_defaults(func=_cmd_delta_compress)
