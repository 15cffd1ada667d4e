"""`llmshrink quantize`: GPTQ (or RTN) into a standard GPTQ checkpoint. Defaults are GPTQConfig's."""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

from ..cliargs import add_run_flags, field_default
from ..models import DEFAULT_MODEL
from .apply import MIXED_FILE
from .config import ROTATIONS, GPTQConfig
from .quantize import quantize

__all__ = ["add_cli"]


def _cmd_quantize(args: argparse.Namespace) -> int:
    config = GPTQConfig(bits=args.bits, group_size=args.group_size, desc_act=args.desc_act, sym=not args.asym,
                        damp_percent=args.damp_percent, true_sequential=not args.no_true_sequential,
                        static_groups=args.static_groups, algorithm=args.method, clip_search=not args.no_clip_search,
                        calib_dtype=args.calib_dtype, lm_head=args.lm_head, partial_groups=args.partial_groups,
                        rotate=args.rotate, target_bits=args.target_bits, embed_bits=args.embed_bits,
                        fp_target=args.fp_target)
    started = time.perf_counter()
    out = quantize(args.model, config, args.out, calibration=args.calib_file, nsamples=args.nsamples,
                   seqlen=args.calib_seqlen, seed=args.seed, overwrite=args.overwrite, sensitivity=args.sensitivity)
    stored = json.loads((Path(out) / "config.json").read_text())["quantization_config"]
    mixed = stored.get("llmshrink", {}).get("mixed_precision")
    if mixed:
        plan = json.loads((Path(out) / MIXED_FILE).read_text())["plan"]
        for name, bits in plan.items():
            print(f"  {name}: {bits} bits")
        counts = Counter(plan.values())
        print(f"mixed precision: {mixed['achieved_bits']:.3f} bits per weight (target {mixed['target_bits']}; "
              + ", ".join(f"{n} linears at {b} bits" for b, n in sorted(counts.items())) + f"; plan in {MIXED_FILE})")
    width = f"{config.bits}-bit" if not mixed else "mixed-precision"
    embedding = f" (input embedding {config.embed_bits}-bit)" if config.embed_bits is not None else ""
    print(f"{config.algorithm} {width} g{stored['group_size']} checkpoint{embedding} written to {out} "
          f"in {time.perf_counter() - started:.0f} s")
    return 0


def add_cli(subparsers) -> None:
    """Add the `quantize` sub-command."""
    d = lambda name: field_default(GPTQConfig, name)  # noqa: E731
    p = subparsers.add_parser("quantize", help="GPTQ (or RTN) weight quantization into a standard GPTQ checkpoint",
                              description="Quantize a model layer by layer and save a GPTQ checkpoint.")
    p.add_argument("--model", default=None, help=f"packaged name, local folder or Hub id (default {DEFAULT_MODEL})")
    p.add_argument("--out", required=True, help="checkpoint folder to write")
    p.add_argument("--bits", type=int, default=d("bits"), help=f"2, 3, 4 or 8 (default {d('bits')})")
    p.add_argument("--group-size", type=int, default=d("group_size"),
                   help=f"input channels per group, -1 for none (default {d('group_size')})")
    p.add_argument("--method", choices=("gptq", "rtn"), default=d("algorithm"))
    p.add_argument("--desc-act", action=argparse.BooleanOptionalAction, default=d("desc_act"),
                   help="act-order: quantize columns by decreasing activation energy (default on)")
    p.add_argument("--static-groups", action=argparse.BooleanOptionalAction, default=d("static_groups"),
                   help="with act-order, keep groups contiguous in the original order, so g_idx stays "
                        "monotone and fast kernels need no reordering (default on)")
    p.add_argument("--asym", action="store_true", help="asymmetric grid (default symmetric)")
    p.add_argument("--no-true-sequential", action="store_true")
    p.add_argument("--no-clip-search", action="store_true", help="plain min/max ranges (textbook GPTQ)")
    p.add_argument("--lm-head", action="store_true", help="also quantize the output head (unties a tied one)")
    p.add_argument("--embed-bits", type=int, default=d("embed_bits"),
                   help="also quantize the input embedding at these bits (2 to 8; a tied head shares it); "
                        "only llmshrink reads it, not GPTQModel or vLLM (default: fp16 embedding)")
    p.add_argument("--fp-target", type=float, default=d("fp_target"), metavar="A",
                   help="share (0 to 1) of each linear's target that is the full-precision model's outputs, "
                        "correcting the error of the layers before (GPTAQ's asymmetric calibration; a second "
                        "forward per layer; default 0: off)")
    p.add_argument("--partial-groups", action="store_true",
                   help="keep --group-size where it does not divide a linear's inputs (a partial last group; "
                        "vLLM cannot read it); by default the size is halved until every linear has whole groups")
    p.add_argument("--rotate", choices=ROTATIONS, default=d("rotate"),
                   help="rotate the model first (as `llmshrink rotate`), then quantize the rotated model")
    p.add_argument("--target-bits", type=float, default=d("target_bits"),
                   help="choose each linear's bits from 2, 3, 4, 8 under this average bits per weight (scales "
                        "and zeros counted), written as `dynamic`; --bits is then ignored")
    p.add_argument("--sensitivity", default=None, metavar="FOLDER_OR_JSON",
                   help="with --target-bits: reuse the losses measured by an earlier --target-bits run on the same "
                        "model (its checkpoint folder or mixed_precision.json), so any budget costs one quantize")
    p.add_argument("--calib-dtype", default=d("calib_dtype"), choices=["auto", "float32", "bfloat16"],
                   help="dtype of the calibration forwards (auto: bfloat16 where the CPU/GPU has native bf16 matmul)")
    p.add_argument("--damp-percent", type=float, default=d("damp_percent"))
    add_run_flags(p, nsamples=128, seqlen=512)
    p.set_defaults(func=_cmd_quantize)
