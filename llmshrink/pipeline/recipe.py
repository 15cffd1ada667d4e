"""Recipes: a YAML file naming a model, a list of method steps, calibration, evaluation and an output folder.

    model: smollm2-135m
    seed: 0
    calibration: {source: wiki, nsamples: 64, seqlen: 512}
    steps:
      - {method: gptq, bits: 4, group_size: 128}
    evaluate: {tasks: [wiki, piqa], limit: 100, seqlen: 512}
    out: runs/quickstart

Each step is exactly a registered method config in its `to_dict` form (`method` picks the
registry entry; `version` is optional), the same form the checkpoint metadata records. The whole
file is validated before any work: unknown keys (with the nearest known one), values of the
wrong type, values a config rejects, steps in an order that cannot work, and steps that need
calibration text when the recipe gives none all fail with the file and line.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from ..calibration import Calibration
from ..config import MethodConfig
from ..errors import UsageError
from ..evals.perplexity import PROTOCOLS
from ..evals.tasks import PPL_TASKS, TASKS
from ..formats import FORMATS
from ..methods import load_builtin_methods, method_for
from ..models import DTYPES

__all__ = ["Calibration", "Evaluation", "Recipe", "RecipeError", "load_recipe", "parse_recipe", "plan_lines"]

logger = logging.getLogger(__name__)

TOP_KEYS = ("model", "seed", "calibration", "steps", "evaluate", "out")
STATE_FILE = "run.json"  # a run folder's state (see run.py)


class RecipeError(UsageError):
    """A recipe problem, prefixed with where it is (`file:line:`)."""


@dataclasses.dataclass
class Evaluation:
    """How the original and the compressed models are scored (see `llmshrink eval`)."""

    tasks: list[str] = dataclasses.field(default_factory=lambda: ["wiki", "piqa", "hellaswag", "arc_easy"])
    limit: int | None = 200
    seqlen: int = 512
    protocol: str = "gptq"
    dtype: str = "float32"
    batch_tokens: int = 4096
    gen_tokens: int = 32
    every_step: bool = True  # also score each intermediate step's output (for the trade-off plot)


@dataclasses.dataclass
class Recipe:
    model: str
    steps: list[MethodConfig]
    out: str
    seed: int = 0
    calibration: Calibration | None = None
    evaluate: Evaluation | None = None
    source: str = "<recipe>"  # the file it came from

    def to_dict(self) -> dict[str, Any]:
        """The recipe as YAML would hold it (what `parse_recipe` reads back)."""
        return {"model": self.model, "seed": self.seed,
                "calibration": None if self.calibration is None else dataclasses.asdict(self.calibration),
                "steps": [s.to_dict() for s in self.steps],
                "evaluate": None if self.evaluate is None else dataclasses.asdict(self.evaluate),
                "out": self.out}


# ----------------------------------------------------------------------------- reading YAML with line numbers

def _lines(node: yaml.Node, path: tuple = (), out: dict | None = None) -> dict[tuple, int]:
    """Map every key path (("steps", 0, "bits")) of a composed YAML document to its 1-based line."""
    out = {} if out is None else out
    out.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            out[path + (key.value,)] = key.start_mark.line + 1
            _lines(value, path + (key.value,), out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out[path + (i,)] = item.start_mark.line + 1
            _lines(item, path + (i,), out)
    return out


def apply_override(data: dict, assignment: str, lines: dict[tuple, int | str]) -> None:
    """Apply one `--set a.b.0.c=value` to the parsed recipe (value read as YAML: 8, true, [a, b])."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"--set {assignment}: write it as KEY=VALUE, e.g. --set steps.0.bits=3")
    parts: list[str | int] = [int(p) if p.isdigit() else p for p in key.strip().split(".")]
    node: Any = data
    for depth, part in enumerate(parts[:-1]):
        where = ".".join(map(str, parts[: depth + 1]))
        if isinstance(node, list) and isinstance(part, int):
            if part >= len(node):
                raise RecipeError(f"--set {assignment}: {where} does not exist (the list has {len(node)} items)")
            node = node[part]
        elif isinstance(node, dict):
            node = node.setdefault(part, {})
        else:
            raise RecipeError(f"--set {assignment}: {where} is not a mapping or list index")
    last = parts[-1]
    if isinstance(node, list) and isinstance(last, int) and last < len(node):
        node[last] = yaml.safe_load(raw)
    elif isinstance(node, dict):
        node[last] = yaml.safe_load(raw)
    else:
        raise RecipeError(f"--set {assignment}: {key} cannot be set")
    lines[tuple(parts)] = f"--set {assignment}"


# ----------------------------------------------------------------------------- validation

class _Where:
    """Formats `file:line: ` prefixes from key paths."""

    def __init__(self, source: str, lines: dict[tuple, int | str]):
        self.source, self.lines = source, lines

    def __call__(self, path: tuple) -> str:
        for n in range(len(path), -1, -1):
            line = self.lines.get(path[:n])
            if isinstance(line, str):
                return f"{line}: "
            if line is not None:
                return f"{self.source}:{line}: "
        return f"{self.source}: "

    def error(self, path: tuple, message: str) -> RecipeError:
        return RecipeError(self(path) + message)


def _type_ok(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (dict,) or hint is dict:
        return isinstance(value, dict)
    if origin in (list, tuple) or hint in (list, tuple):
        return isinstance(value, (list, tuple))
    return True  # anything else: left to the config's own validate


def _type_name(hint: Any) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


def _build(cls: type, data: Any, path: tuple, where: _Where, what: str, skip: tuple[str, ...] = ()):
    """cls(**data) with unknown keys, wrong types and rejected values reported at their line."""
    if not isinstance(data, dict):
        raise where.error(path, f"{what} must be a mapping of keys to values, not {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in data.items():
        if key in skip:
            continue
        if key not in names:
            near = difflib.get_close_matches(str(key), names, n=1)
            raise where.error(path + (key,), f"{what}: unknown key '{key}'"
                              + (f"; did you mean '{near[0]}'?" if near else f"; known keys: {', '.join(names)}"))
        if not _type_ok(value, hints[key]):
            hint = ""
            if isinstance(value, int) and _type_ok("", hints[key]):
                hint = " (quote it: YAML reads 2:4 as the number 124, and digits as numbers)"
            if isinstance(value, str) and _type_ok(1.0, hints[key]):
                try:
                    hint = f" (YAML reads '{value}' as text; write {float(value)!r})"
                except ValueError:
                    pass
            raise where.error(path + (key,), f"{what}: {key}={value!r} should be {_type_name(hints[key])}{hint}")
        values[key] = value
    try:
        return cls(**values)
    except UsageError as e:
        field = str(e).split("=", 1)[0].strip()
        raise where.error(path + ((field,) if field in values else ()), f"{what}: {e}") from None


def _step(data: Any, i: int, where: _Where) -> MethodConfig:
    path = ("steps", i)
    methods = load_builtin_methods()
    if not isinstance(data, dict) or "method" not in data:
        raise where.error(path, f"steps[{i}] needs a 'method' key naming one of: {', '.join(sorted(methods))}")
    method = data["method"]
    if method not in methods:
        near = difflib.get_close_matches(str(method), list(methods), n=1)
        raise where.error(path + ("method",), f"steps[{i}]: unknown method '{method}'"
                          + (f"; did you mean '{near[0]}'?" if near else "")
                          + f"; known: {', '.join(sorted(methods))}")
    cls = methods[method].config
    version = data.get("version", cls.VERSION)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise where.error(path + ("version",), f"steps[{i}] ({method}): version {version!r} is not a config version; "
                                               f"leave it out or write {cls.VERSION}")
    if version > cls.VERSION:
        raise where.error(path + ("version",), f"steps[{i}] ({method}): version {version!r} is newer than this "
                                               f"llmshrink understands (version {cls.VERSION}); upgrade llmshrink")
    return _build(cls, data, path, where, f"steps[{i}] ({method})", skip=("method", "version"))


def parse_recipe(data: Any, source: str = "<recipe>", lines: dict[tuple, int | str] | None = None) -> Recipe:
    """Validate a parsed recipe mapping into a Recipe (configs built, order checked)."""
    where = _Where(source, lines or {})
    if not isinstance(data, dict):
        raise where.error((), "a recipe is a mapping with keys " + ", ".join(TOP_KEYS))
    for key in data:
        if key not in TOP_KEYS:
            near = difflib.get_close_matches(str(key), TOP_KEYS, n=1)
            raise where.error((key,), f"unknown key '{key}'"
                              + (f"; did you mean '{near[0]}'?" if near else f"; known: {', '.join(TOP_KEYS)}"))
    for key in ("model", "steps", "out"):
        if key not in data or data[key] in (None, "", []):
            raise where.error((), f"the recipe needs '{key}'" + {
                "model": " (a packaged name such as smollm2-135m, a folder or a Hub id)",
                "steps": " (a list of method steps, e.g. - {method: gptq, bits: 4})",
                "out": " (the run folder to write)"}[key])
    if not isinstance(data["steps"], list):
        raise where.error(("steps",), "steps must be a list of method steps (each line starting with '- ')")
    if not isinstance(data.get("seed", 0), int) or isinstance(data.get("seed", 0), bool):
        raise where.error(("seed",), f"seed={data['seed']!r} should be an integer")
    recipe = Recipe(
        model=str(data["model"]), out=str(data["out"]), seed=data.get("seed", 0), source=source,
        steps=[_step(s, i, where) for i, s in enumerate(data["steps"])],
        calibration=None if data.get("calibration") is None
        else _build(Calibration, data["calibration"], ("calibration",), where, "calibration"),
        evaluate=None if data.get("evaluate") is None
        else _build(Evaluation, data["evaluate"], ("evaluate",), where, "evaluate"),
    )
    _check_calibration(recipe, where)
    _check_calibration_values(recipe, where)
    _check_evaluation(recipe, where)
    for warning in check_order(recipe, where):
        logger.warning(warning)
    return recipe


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read, override (`--set`) and validate a recipe file."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe {path} does not exist; give a YAML file such as recipes/quickstart.yaml")
    text = path.read_text()
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise RecipeError(f"{path}{line}: not valid YAML ({getattr(e, 'problem', e)})") from None
    lines = _lines(node) if node is not None else {}
    for assignment in overrides:
        if not isinstance(data, dict):
            break
        apply_override(data, assignment, lines)
    return parse_recipe(data, source=str(path), lines=lines)


# ----------------------------------------------------------------------------- what each step needs and makes
# (all of it declared by each step's method: llmshrink.methods)

def _check_calibration(recipe: Recipe, where: _Where) -> None:
    if recipe.calibration is not None:
        return
    for i, step in enumerate(recipe.steps):
        if method_for(step).calibrated(step):
            raise where.error(("steps", i), f"steps[{i}] ({step.METHOD}) needs calibration text but the recipe has "
                                            "none; add 'calibration: {source: wiki, nsamples: 128, seqlen: 512}'")


def _check_calibration_values(recipe: Recipe, where: _Where) -> None:
    c = recipe.calibration
    if c is None:
        return
    if c.nsamples < 1 or c.seqlen < 2:
        raise where.error(("calibration",), f"calibration: nsamples={c.nsamples}, seqlen={c.seqlen} give no "
                                            "windows; use nsamples >= 1 and seqlen >= 2 (e.g. 128 x 512)")
    if c.source != "wiki" and not Path(c.source).expanduser().is_file():
        raise where.error(("calibration", "source"), f"calibration: source '{c.source}' is neither wiki nor a "
                                                     "file that exists; give wiki or a .txt/.jsonl path")


def _check_evaluation(recipe: Recipe, where: _Where) -> None:
    e = recipe.evaluate
    if e is None:
        return
    checks = [("tasks", bool(e.tasks), "tasks is empty; list what to score, e.g. [wiki, piqa]"),
              ("protocol", e.protocol in PROTOCOLS, f"protocol '{e.protocol}' is unknown; use {', '.join(PROTOCOLS)}"),
              ("dtype", e.dtype in DTYPES, f"dtype '{e.dtype}' is unknown; use float32, bfloat16 or float16"),
              ("seqlen", e.seqlen >= 2, f"seqlen={e.seqlen} is too short; use at least 2 (512 is usual)"),
              ("batch_tokens", e.batch_tokens >= 1, f"batch_tokens={e.batch_tokens} must be positive"),
              ("gen_tokens", e.gen_tokens >= 0, f"gen_tokens={e.gen_tokens} must be 0 (skip) or more")]
    for key, ok, message in checks:
        if not ok:
            raise where.error(("evaluate", key), f"evaluate: {message}")
    for task in recipe.evaluate.tasks:
        if task not in TASKS and task not in PPL_TASKS:
            raise where.error(("evaluate", "tasks"), f"evaluate: unknown task '{task}'; choose from "
                                                     f"{', '.join([*PPL_TASKS, *TASKS])}")
    if recipe.evaluate.limit is not None and recipe.evaluate.limit < 1:
        raise where.error(("evaluate", "limit"), f"evaluate: limit={recipe.evaluate.limit} selects nothing; "
                                                 "use a positive number or null for all")


def check_order(recipe: Recipe, where: _Where | None = None) -> list[str]:
    """Raise RecipeError for steps that cannot follow what came before; return warnings for odd
    but workable orders. Each method declares the kinds it accepts (and may add rules of its own);
    each kind says why a step cannot take it."""
    where = where or _Where(recipe.source, {})
    warnings = []
    kind, before = "dense", "the original model"
    for i, step in enumerate(recipe.steps):
        method, at = method_for(step), ("steps", i)
        name = f"steps[{i}] ({step.METHOD})"
        fmt = FORMATS.get(kind)
        if (fmt is not None and fmt.final) or ("*" not in method.accepts and kind not in method.accepts):
            refusal = fmt.refusal if fmt is not None else "{name} cannot follow {before}"
            raise where.error(at, refusal.format(name=name, before=before, method=step.METHOD))
        if method.check is not None:
            try:
                for warning in method.check(step, input_kind=kind, earlier=recipe.steps[:i], before=before):
                    warnings.append(f"{where(at)}{name} {warning}")
            except UsageError as e:
                raise where.error(at, f"{name} {e}") from None
        kind, before = method.output_kind(step, kind), name
    return warnings


def output_kinds(steps: list) -> list[str]:
    """The kind of folder each step writes, each from its config and the kind before it."""
    kinds, kind = [], "dense"
    for step in steps:
        kind = method_for(step).output_kind(step, kind)
        kinds.append(kind)
    return kinds


def plan_lines(recipe: Recipe) -> list[str]:
    """Human-readable plan: one line per step with its method's headline fields and any other
    non-default ones."""
    out = [f"recipe {recipe.source}: {recipe.model} -> {recipe.out} (seed {recipe.seed})"]
    kinds = output_kinds(recipe.steps)
    for i, step in enumerate(recipe.steps):
        method, default = method_for(step), type(step)()
        changed = {f.name: getattr(step, f.name) for f in dataclasses.fields(step)
                   if f.name in method.headline or getattr(step, f.name) != getattr(default, f.name)}
        settings = " ".join(f"{k}={v}" for k, v in changed.items()) or "(defaults)"
        calib = ""
        if method.calibrated(step):
            c = recipe.calibration
            calib = f"  [calibration: {c.source}, {c.nsamples} x {c.seqlen} tokens]"
        out.append(f"  {i + 1}. {step.METHOD:<12} {settings}{calib}  -> {kinds[i]}")
    if recipe.evaluate:
        e = recipe.evaluate
        scope = "the original and every step's output" if e.every_step else "the original and the final model"
        out.append(f"  evaluate {', '.join(e.tasks)} (limit {e.limit}, seqlen {e.seqlen}) on {scope}")
    return out
