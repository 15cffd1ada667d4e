"""The `llmshrink` command line: one program, one sub-command per job.

Bad input ends in one line on stderr (`llmshrink: error: ...`) and exit code 2, with nothing written.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .errors import Interrupted, UsageError

__all__ = ["main", "build_parser"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, instead of usage + message
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _whole_number(text: str, minimum: int, below: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"{value} {below}")
    return value


def _positive_int(text: str) -> int:
    return _whole_number(text, 1, "selects nothing; use a positive number")


def _count(text: str) -> int:
    return _whole_number(text, 0, "is negative; use 0 or more")


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of whole numbers") from None


def _tasks(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _cmd_eval(args: argparse.Namespace) -> int:
    from rich.console import Console

    from .evals import EvalSpec, compare_models, evaluate_model
    from .evals.report import print_table, to_markdown
    from .io import atomic_write_json, check_writable_file

    output = check_writable_file(args.output) if args.output else None
    spec = EvalSpec(model=args.model, tasks=args.tasks, limit=args.limit, text_file=args.text_file,
                    protocol=args.protocol, bos=args.bos, seqlen=args.seqlen, stride=args.stride, dtype=args.dtype,
                    batch_tokens=args.batch_tokens, gen_tokens=args.gen_tokens)
    if args.compare:
        a, b = compare_models(spec, args.compare)
        record = {"models": [a, b]}
    else:
        a, b = evaluate_model(spec), None
        record = a
    console = Console()
    print_table(a, b, console=console)
    if args.markdown:
        print(to_markdown(a, b))
    if output:
        atomic_write_json(output, record)
        console.print(f"results written to {output}")
    return 0


def _cmd_quantize(args: argparse.Namespace) -> int:
    import time

    from .gptq.config import GPTQConfig
    from .gptq.quantize import quantize

    config = GPTQConfig(bits=args.bits, group_size=args.group_size, desc_act=args.desc_act, sym=not args.asym,
                        damp_percent=args.damp_percent, true_sequential=not args.no_true_sequential,
                        static_groups=args.static_groups, algorithm=args.method, clip_search=not args.no_clip_search,
                        calib_dtype=args.calib_dtype, lm_head=args.lm_head, partial_groups=args.partial_groups)
    started = time.perf_counter()
    out = quantize(args.model, config, args.out, calibration=args.calib_file, nsamples=args.nsamples,
                   seqlen=args.calib_seqlen, seed=args.seed, overwrite=args.overwrite)
    stored = json.loads((Path(out) / "config.json").read_text())["quantization_config"]
    print(f"{config.algorithm} {config.bits}-bit g{stored['group_size']} checkpoint written to {out} "
          f"in {time.perf_counter() - started:.0f} s")
    return 0


def _cmd_delta_compress(args: argparse.Namespace) -> int:
    import time

    from .delta import DeltaConfig, compress_delta
    from .io import folder_size

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


def _cmd_prune(args: argparse.Namespace) -> int:
    from transformers import AutoConfig

    from .calibration import check_seqlen
    from .io import check_writable_file, prepare_out
    from .models import load_model, resolve_model
    from .prune import LayerPruneConfig, WeightPruneConfig, prune, save_pruned
    from .prune.report import print_scores, plot_scores

    if (args.layers is None) == (args.sparsity is None):
        raise UsageError("give --layers N (remove decoder layers) or --sparsity S (zero weights), not both or neither")
    if args.layers is not None:
        config = LayerPruneConfig(layers=args.layers, criterion=args.criterion, candidates=args.candidates)
    else:
        config = WeightPruneConfig(sparsity=args.sparsity, score=args.score, pattern=args.pattern, scope=args.scope)
    out = prepare_out(args.out, args.overwrite)
    plot = check_writable_file(args.plot, flag="--plot") if args.plot else out.with_name(out.name + "-scores.png")
    resolved = resolve_model(args.model)
    model_config = AutoConfig.from_pretrained(resolved, trust_remote_code=False)  # checks before the load
    n_layers = getattr(model_config, "num_hidden_layers", None)
    if args.layers is not None and n_layers is not None and args.layers >= n_layers:
        raise UsageError(f"removing {args.layers} of {n_layers} decoder layers leaves none; remove at most {n_layers - 1}")
    check_seqlen(model_config, args.calib_seqlen)
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


def _cmd_prepare(args: argparse.Namespace) -> int:
    from .models import resolve_model

    print(resolve_model(args.model))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .evals.harness import DEFAULT_TASKS
    from .evals.perplexity import BOS_CHOICES, PROTOCOLS
    from .evals.tasks import PPL_TASKS, TASKS
    from .models import DEFAULT_MODEL
    from .prune import LayerPruneConfig

    parser = _Parser(prog="llmshrink", description="Make Hugging Face language models smaller and cheaper.")
    parser.add_argument("-v", "--verbose", action="store_true", help="show debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("eval", help="perplexity and downstream tasks, one model or two side by side",
                       description="Evaluate a model on perplexity corpora and downstream tasks.")
    p.add_argument("--model", default=None, help=f"packaged name, local folder or Hub id (default {DEFAULT_MODEL})")
    p.add_argument("--compare", metavar="MODEL", help="a second model to evaluate the same way, side by side")
    p.add_argument("--tasks", type=_tasks, default=DEFAULT_TASKS,
                   help=f"comma-separated; perplexity: {', '.join(PPL_TASKS)}; tasks: {', '.join(TASKS)} "
                        f"(default {','.join(DEFAULT_TASKS)})")
    p.add_argument("--text-file", help="also report perplexity on a local .txt or .jsonl (field 'text') file")
    p.add_argument("--limit", type=_positive_int, help="first N items of each task and first N documents of each corpus")
    p.add_argument("--protocol", choices=PROTOCOLS, default="gptq",
                   help="perplexity protocol (default gptq; rolling: lm-eval's rolling loglikelihood)")
    p.add_argument("--bos", choices=BOS_CHOICES, default="auto",
                   help="BOS in front of every window (rolling: of every document); auto: when the tokenizer "
                        "adds one by default")
    p.add_argument("--seqlen", type=_positive_int, default=2048, help="perplexity window (default 2048)")
    p.add_argument("--stride", type=_positive_int, help="sliding protocol stride (default seqlen/2)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--batch-tokens", type=_positive_int, default=4096, help="padded tokens per forward pass")
    p.add_argument("--gen-tokens", type=_count, default=32, help="tokens generated to time decoding (0 skips)")
    p.add_argument("--output", help="write results JSON here")
    p.add_argument("--markdown", action="store_true", help="also print the table as markdown")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("quantize", help="GPTQ (or RTN) weight quantization into a standard GPTQ checkpoint",
                       description="Quantize a model layer by layer and save a GPTQ checkpoint.")
    p.add_argument("--model", default=None, help=f"packaged name, local folder or Hub id (default {DEFAULT_MODEL})")
    p.add_argument("--out", required=True, help="checkpoint folder to write")
    p.add_argument("--bits", type=int, default=4, help="2, 3, 4 or 8 (default 4)")
    p.add_argument("--group-size", type=int, default=128, help="input channels per group, -1 for none (default 128)")
    p.add_argument("--method", choices=("gptq", "rtn"), default="gptq")
    p.add_argument("--desc-act", action=argparse.BooleanOptionalAction, default=True,
                   help="act-order: quantize columns by decreasing activation energy (default on)")
    p.add_argument("--static-groups", action=argparse.BooleanOptionalAction, default=True,
                   help="with act-order, keep groups contiguous in the original order, so g_idx stays "
                        "monotone and fast kernels need no reordering (default on)")
    p.add_argument("--asym", action="store_true", help="asymmetric grid (default symmetric)")
    p.add_argument("--no-true-sequential", action="store_true")
    p.add_argument("--no-clip-search", action="store_true", help="plain min/max ranges (textbook GPTQ)")
    p.add_argument("--lm-head", action="store_true", help="also quantize the output head (unties a tied one)")
    p.add_argument("--partial-groups", action="store_true",
                   help="keep --group-size where it does not divide a linear's inputs (a partial last group; "
                        "vLLM cannot read it); by default the size is halved until every linear has whole groups")
    p.add_argument("--calib-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="dtype of the calibration forwards (auto: bfloat16 where the CPU/GPU has native bf16 matmul)")
    p.add_argument("--damp-percent", type=float, default=0.01)
    p.add_argument("--calib-file", help="local .txt/.jsonl calibration text (default: the wiki calibration half)")
    p.add_argument("--nsamples", type=_positive_int, default=128)
    p.add_argument("--calib-seqlen", type=_positive_int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=_cmd_quantize)

    p = sub.add_parser("delta", help="store a fine-tune as a compressed difference from its base",
                       description="Delta compression of fine-tuned models.")
    delta = p.add_subparsers(dest="delta_command", metavar="ACTION", parser_class=_Parser, required=True)
    p = delta.add_parser("compress", help="write a delta folder (loads with llmshrink.AutoModelForCausalLM)",
                         description="Compress FINETUNED as a delta from BASE; the folder records the base's hash.")
    p.add_argument("--base", required=True, help="the base model: packaged name, folder or cached Hub id")
    p.add_argument("--finetuned", required=True, help="the fine-tuned model (same architecture)")
    p.add_argument("--out", required=True, help="delta folder to write")
    p.add_argument("--method", choices=("bitdelta", "lowrank", "dare", "mixed"), default="bitdelta")
    p.add_argument("--scale-granularity", choices=("tensor", "row"), default="tensor", help="bitdelta scales")
    p.add_argument("--distill-steps", type=int, default=0, help="bitdelta scale distillation steps (default 0)")
    p.add_argument("--distill-lr", type=float, default=1e-2)
    p.add_argument("--rank", type=int, help="lowrank: fixed rank")
    p.add_argument("--energy", type=float, help="lowrank: keep this share of the delta's squared norm")
    p.add_argument("--p", type=float, default=0.9, help="dare: share of delta entries dropped (default 0.9)")
    p.add_argument("--mixed-ranks", type=_ints, default=(2, 32, 64), help="mixed: directions per band (default 2,32,64)")
    p.add_argument("--mixed-bits", type=_ints, default=(8, 3, 2), help="mixed: bits per band (default 8,3,2)")
    p.add_argument("--min-numel", type=int, default=100_000, help="smaller tensors are stored exactly")
    p.add_argument("--exact", action="append", default=[], metavar="GLOB", help="also store these tensors exactly")
    p.add_argument("--exact-dtype", choices=("float16", "bfloat16", "float32"), default="float32")
    p.add_argument("--exact-format", choices=("delta", "full"), default="delta")
    p.add_argument("--revision", help="the base's Hub revision, recorded in the delta")
    p.add_argument("--calib-file", help="distillation text, .txt/.jsonl (default: the wiki calibration half)")
    p.add_argument("--nsamples", type=_positive_int, default=128)
    p.add_argument("--calib-seqlen", type=_positive_int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=_cmd_delta_compress)

    p = sub.add_parser("prune", help="remove decoder layers or zero weights, chosen on calibration text",
                       description="Layer pruning (--layers N) or weight pruning (--sparsity S) into a normal checkpoint.")
    p.add_argument("--model", default=None, help=f"packaged name, local folder or Hub id (default {DEFAULT_MODEL})")
    p.add_argument("--out", required=True, help="checkpoint folder to write")
    p.add_argument("--layers", type=_positive_int, help="decoder layers to remove")
    p.add_argument("--criterion", default="block_influence", choices=("block_influence", "angular", "last"))
    p.add_argument("--candidates", type=_positive_int, default=LayerPruneConfig.candidates,
                   help="measure the criterion's best N removals on calibration text and take the best measured "
                        f"(default {LayerPruneConfig.candidates}; 1: the criterion's choice)")
    p.add_argument("--plot", help="bar chart of the layer scores (default OUT-scores.png beside --out)")
    p.add_argument("--sparsity", type=float, help="share of decoder-linear weights to zero, in [0, 1)")
    p.add_argument("--score", default="wanda", choices=("wanda", "magnitude"))
    p.add_argument("--pattern", default="unstructured", choices=("unstructured", "2:4"))
    p.add_argument("--scope", default="layer", choices=("layer", "global"))
    p.add_argument("--calib-file", help="local .txt/.jsonl calibration text (default: the wiki calibration half)")
    p.add_argument("--nsamples", type=_positive_int, default=64)
    p.add_argument("--calib-seqlen", type=_positive_int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=_cmd_prune)

    from .heal import add_cli as add_heal_cli
    from .hub import add_cli as add_push_cli
    from .pack import add_cli as add_pack_cli
    from .pipeline import add_cli as add_run_cli

    add_heal_cli(sub)  # heal

    add_pack_cli(sub)  # pack, unpack

    add_run_cli(sub)  # run

    add_push_cli(sub)  # push

    sub.add_parser("lm-eval", add_help=False, help="lm-evaluation-harness's command line, with every llmshrink "
                   "format loadable by --model hf (arguments as lm_eval takes them)")

    p = sub.add_parser("prepare", help="convert a packaged model into the cache and print its folder",
                       description="Resolve a model name (converting the packaged GGUF once) and print its folder.")
    p.add_argument("--model", default=None, help=f"packaged name, local folder or Hub id (default {DEFAULT_MODEL})")
    p.set_defaults(func=_cmd_prepare)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["lm-eval"]:  # every argument is lm-eval's own: no parsing here
            from .evals.lm_eval_entry import main as lm_eval_main

            return lm_eval_main(argv[1:])
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                            format="%(levelname)s %(name)s: %(message)s")
        if not args.verbose:
            import transformers

            transformers.logging.set_verbosity_error()
        return args.func(args)
    except UsageError as e:
        print(f"llmshrink: error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"llmshrink: interrupted; {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("llmshrink: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
