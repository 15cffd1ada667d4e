"""Pieces every sub-command's parser shares: the one-line-error parser, argument types, and
flags whose defaults are read from a method config's dataclass fields (so defaults live once)."""

from __future__ import annotations

import argparse
import dataclasses

from .calibration import Calibration
from .errors import UsageError
from .methods import compress

__all__ = ["Parser", "add_config_flags", "add_method_command", "add_run_flags", "calibration_from_args",
           "config_from_args", "count", "field_default", "field_docs", "ints", "positive_int", "tasks"]


class Parser(argparse.ArgumentParser):
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


def positive_int(text: str) -> int:
    return _whole_number(text, 1, "selects nothing; use a positive number")


def count(text: str) -> int:
    return _whole_number(text, 0, "is negative; use 0 or more")


def ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of whole numbers") from None


def tasks(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def field_default(config_cls: type, name: str):
    """The default of field `name` of a config dataclass."""
    for f in dataclasses.fields(config_cls):
        if f.name == name:
            return f.default_factory() if f.default is dataclasses.MISSING else f.default
    raise KeyError(f"{config_cls.__name__} has no field '{name}'")


def field_docs(config_cls: type) -> dict[str, str]:
    """Each field's text from the config's docstring `Args:` section (`name: text`, continued on
    more deeply indented lines)."""
    docs, current, in_args = {}, None, False
    for line in (config_cls.__doc__ or "").splitlines():
        stripped = line.strip()
        if stripped == "Args:":
            in_args = True
            continue
        if not in_args or not stripped:
            continue
        head, sep, text = stripped.partition(":")
        names = [n.strip() for n in head.split(",")]
        if sep and all(n.isidentifier() for n in names) and len(line) - len(line.lstrip()) <= 8:
            for n in names:
                docs[n] = text.strip()
            current = names
        elif current:
            for n in current:
                docs[n] += " " + stripped
    return docs


def add_config_flags(parser: argparse.ArgumentParser, config_cls: type, skip: tuple[str, ...] = ()) -> None:
    """One `--field-name` flag per field of `config_cls` (type and default from the field, help from
    the docstring); booleans get `--name/--no-name`."""
    docs = field_docs(config_cls)
    for f in dataclasses.fields(config_cls):
        if f.name in skip:
            continue
        default = field_default(config_cls, f.name)
        flag, text = "--" + f.name.replace("_", "-"), docs.get(f.name, "")
        if isinstance(default, bool):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default, help=text)
        elif isinstance(default, (int, float, str)):
            parser.add_argument(flag, dest=f.name, type=type(default), default=default,
                                help=f"{text} (default {default})".strip())
        # other field types (None defaults, tuples, dicts) are set in recipes, not flags


def add_run_flags(parser: argparse.ArgumentParser, nsamples: int, seqlen: int,
                  text: str = "local .txt/.jsonl calibration text", seed: bool = True,
                  calibration: bool = True) -> None:
    """The flags every compressing command ends with: calibration text and windows (unless
    `calibration` is off), seed (unless the config has its own), overwrite."""
    if calibration:
        parser.add_argument("--calib-file", help=f"{text} (default: the wiki calibration half)")
        parser.add_argument("--nsamples", type=positive_int, default=nsamples)
        parser.add_argument("--calib-seqlen", type=positive_int, default=seqlen)
    if seed:
        parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")


def config_from_args(config_cls: type, args: argparse.Namespace):
    """The config made from the flags `add_config_flags` added (validated)."""
    return config_cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(config_cls) if hasattr(args, f.name)})


def calibration_from_args(args: argparse.Namespace) -> Calibration | None:
    """The Calibration of the flags `add_run_flags` added, or None where it added none."""
    if not hasattr(args, "calib_file"):
        return None
    return Calibration(source=args.calib_file or "wiki", nsamples=args.nsamples, seqlen=args.calib_seqlen)


def add_method_command(subparsers, method, command: str, help: str, out_required: bool = True,
                       out_help: str = "folder to write") -> argparse.ArgumentParser:
    """A sub-command for `method` made from its config alone: --model, --out, --overwrite, one flag
    per config field, and calibration flags when the method may calibrate; it runs `compress`.
    With `out_required` off, a command that wraps the returned parser's `func` handles a run
    without --out (such a run reaching `compress` is refused)."""
    p = subparsers.add_parser(command, help=help, description=help)
    p.add_argument("--model", default=None, help="packaged name, local folder or Hub id (default the packaged model)")
    p.add_argument("--out", required=out_required, help=out_help)
    add_config_flags(p, method.config)
    fields = {f.name for f in dataclasses.fields(method.config)}
    add_run_flags(p, field_default(Calibration, "nsamples"), field_default(Calibration, "seqlen"),
                  seed="seed" not in fields,  # a config's own seed field is its --seed
                  calibration=method.needs_calibration is not False)  # only a method that may read text

    def run(args: argparse.Namespace) -> int:
        config = config_from_args(method.config, args)
        if args.out is None:
            raise UsageError(f"{command} needs --out, the folder to write (see '{p.prog} --help')")
        out = compress(args.model, config, args.out, calibration=calibration_from_args(args),
                       seed=getattr(args, "seed", 0), overwrite=args.overwrite)
        print(f"{method.name} output written to {out}")
        return 0

    p.set_defaults(func=run)
    return p
