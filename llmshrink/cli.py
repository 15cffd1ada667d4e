"""The `llmshrink` command line: one program, one sub-command per job.

Bad input ends in one line on stderr (`llmshrink: error: ...`) and exit code 2, with nothing written.
"""

from __future__ import annotations

import argparse
import logging
import sys

import transformers
from rich.console import Console

from .cliargs import Parser, count, positive_int, tasks
from .errors import Interrupted, UsageError
from .evals.harness import DEFAULT_TASKS, EvalSpec, compare_models, evaluate_model
from .evals.lm_eval_entry import main as lm_eval_main
from .evals.perplexity import BOS_CHOICES, PROTOCOLS
from .evals.report import print_table, to_markdown
from .evals.tasks import PPL_TASKS, TASKS
from .hub import add_cli as add_push_cli
from .io import atomic_write_json, check_writable_file
from .methods import load_builtin_methods
from .models import DEFAULT_MODEL, resolve_model
from .pipeline import add_cli as add_run_cli

__all__ = ["main", "build_parser"]


def _cmd_eval(args: argparse.Namespace) -> int:
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


def _cmd_prepare(args: argparse.Namespace) -> int:
    print(resolve_model(args.model))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="llmshrink", description="Make Hugging Face language models smaller and cheaper.")
    parser.add_argument("-v", "--verbose", action="store_true", help="show debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    p = sub.add_parser("eval", help="perplexity and downstream tasks, one model or two side by side",
                       description="Evaluate a model on perplexity corpora and downstream tasks.")
    p.add_argument("--model", default=None, help=f"packaged name, local folder or Hub id (default {DEFAULT_MODEL})")
    p.add_argument("--compare", metavar="MODEL", help="a second model to evaluate the same way, side by side")
    p.add_argument("--tasks", type=tasks, default=DEFAULT_TASKS,
                   help=f"comma-separated; perplexity: {', '.join(PPL_TASKS)}; tasks: {', '.join(TASKS)} "
                        f"(default {','.join(DEFAULT_TASKS)})")
    p.add_argument("--text-file", help="also report perplexity on a local .txt or .jsonl (field 'text') file")
    p.add_argument("--limit", type=positive_int, help="first N items of each task and first N documents of each corpus")
    p.add_argument("--protocol", choices=PROTOCOLS, default="gptq",
                   help="perplexity protocol (default gptq; rolling: lm-eval's rolling loglikelihood)")
    p.add_argument("--bos", choices=BOS_CHOICES, default="auto",
                   help="BOS in front of every window (rolling: of every document); auto: when the tokenizer "
                        "adds one by default")
    p.add_argument("--seqlen", type=positive_int, default=2048, help="perplexity window (default 2048)")
    p.add_argument("--stride", type=positive_int, help="sliding protocol stride (default seqlen/2)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--batch-tokens", type=positive_int, default=4096, help="padded tokens per forward pass")
    p.add_argument("--gen-tokens", type=count, default=32, help="tokens generated to time decoding (0 skips)")
    p.add_argument("--output", help="write results JSON here")
    p.add_argument("--markdown", action="store_true", help="also print the table as markdown")
    p.set_defaults(func=_cmd_eval)

    added = set()
    for method in load_builtin_methods().values():  # each method's own sub-commands
        if method.add_cli is not None and method.add_cli not in added:
            method.add_cli(sub)
            added.add(method.add_cli)
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
            return lm_eval_main(argv[1:])
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                            format="%(levelname)s %(name)s: %(message)s")
        if not args.verbose:
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
