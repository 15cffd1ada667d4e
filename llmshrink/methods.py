"""The method registry: every compression method registers one `Method`, and the pipeline, the CLI,
the model card and `llmshrink.compress` read only what it declares.

A method lives in one folder, `llmshrink/<name>/`, whose `method.py` calls `register(Method(...))`
(the built-in folders are found by `load_builtin_methods`, so a new folder needs no edit
elsewhere). A `Method` says:

- `config`: its `MethodConfig` dataclass (its `METHOD` is the name recipes and records use);
- `run(source, config, out, context)`: folder (or name) in, folder out, written whole;
- `output`: the kind of folder it writes (a name in `llmshrink.formats`, or a function of the config
  and the kind of its input);
- `accepts`: the kinds of input it can take ("*": any); `check`: further order rules of its own;
- `needs_calibration`: whether it draws windows from the recipe's calibration text;
- `headline`: the config fields every plan line shows; `hub_tags`: the model card's tags (and
  `record`, the config.json key by which a folder shows it was made so);
- `add_cli`: its sub-command(s), whose defaults come from the config's fields.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import os
import pkgutil
from pathlib import Path
from typing import Any, Callable

from .calibration import Calibration
from .config import MethodConfig
from .errors import UsageError
from .io import prepare_out
from .models import DEFAULT_MODEL

__all__ = ["Context", "Method", "METHODS", "compress", "config_from_dict", "load_builtin_methods", "method_for",
           "register"]


@dataclasses.dataclass(frozen=True)
class Context:
    """What a method's `run` gets besides its input, its config and its output folder."""

    calibration: Calibration | None = None  # None: the method's own default text (the wiki calibration half)
    seed: int = 0
    progress: bool = True
    overwrite: bool = False
    original: str | None = None  # the model the run began from (a teacher, a delta's base)

    def calibration_kwargs(self) -> dict:
        """`calibration=, nsamples=, seqlen=` as the methods' public functions take them."""
        c = self.calibration
        return {} if c is None else {"calibration": None if c.source == "wiki" else c.source,
                                     "nsamples": c.nsamples, "seqlen": c.seqlen}


@dataclasses.dataclass(frozen=True)
class Method:
    config: type[MethodConfig]
    run: Callable[[str, Any, Path, Context], None]
    output: str | Callable[[Any], str] = "dense"
    accepts: tuple[str, ...] = ("dense",)
    needs_calibration: bool | Callable[[Any], bool] = False
    headline: tuple[str, ...] = ()
    hub_tags: tuple[str, ...] = ()
    record: str | None = None  # the config.json key its outputs carry (a card tags a folder that has it)
    changes_architecture: bool = False  # its output has another shape than its input (fewer layers, ...)
    # check(config, input_kind=, earlier=[configs], before="steps[0] (gptq)") -> warnings; raises
    # UsageError("<what is wrong; the fix>") for an order that cannot work
    check: Callable[..., list[str]] | None = None
    add_cli: Callable[[Any], None] | None = None  # add_cli(subparsers)

    @property
    def name(self) -> str:
        return self.config.METHOD

    def output_kind(self, config: MethodConfig, input_kind: str = "dense") -> str:
        return self.output(config, input_kind) if callable(self.output) else self.output

    def calibrated(self, config: MethodConfig) -> bool:
        return self.needs_calibration(config) if callable(self.needs_calibration) else bool(self.needs_calibration)


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add `method` to the registry (once per name); returns it."""
    name = method.config.METHOD
    if not name:
        raise ValueError(f"{method.config.__name__} has no METHOD name")
    if name in METHODS and METHODS[name] is not method:
        raise ValueError(f"method '{name}' is already registered")
    METHODS[name] = method
    return method


_BUILTIN_LOADED = False


def load_builtin_methods() -> dict[str, Method]:
    """Import `method.py` of every folder of llmshrink that has one (each registers itself)."""
    global _BUILTIN_LOADED
    if not _BUILTIN_LOADED:
        _BUILTIN_LOADED = True
        root = Path(__file__).resolve().parent
        for info in sorted(pkgutil.iter_modules([str(root)]), key=lambda i: i.name):
            if info.ispkg and (root / info.name / "method.py").is_file():
                importlib.import_module(f"{__package__}.{info.name}.method")
    return METHODS


def _unknown(method: Any) -> UsageError:
    near = difflib.get_close_matches(str(method), list(METHODS), n=1)
    return UsageError(f"unknown method '{method}'" + (f"; did you mean '{near[0]}'?" if near else "")
                      + f"; known: {', '.join(sorted(METHODS)) or 'none'}")


def method_for(config_or_name: MethodConfig | str) -> Method:
    """The registered Method of a config (or of a method name)."""
    load_builtin_methods()
    name = config_or_name if isinstance(config_or_name, str) else config_or_name.METHOD
    if name not in METHODS:
        raise _unknown(name)
    method = METHODS[name]
    if not isinstance(config_or_name, (str, method.config)):
        raise UsageError(f"{type(config_or_name).__name__} is not the config of method '{name}'")
    return method


def config_from_dict(data: dict[str, Any]) -> MethodConfig:
    """Rebuild any registered method's config from its `to_dict` form."""
    load_builtin_methods()
    method = data.get("method")
    if method not in METHODS:
        raise _unknown(method)
    return METHODS[method].config.from_dict(data)


def compress(source: str | os.PathLike | None, config: MethodConfig, out: str | os.PathLike,
             calibration: Calibration | None = None, seed: int = 0, progress: bool = True,
             overwrite: bool = False, original: str | os.PathLike | None = None) -> Path:
    """Run any registered method: `source` (packaged name, folder or Hub id) -> `config` -> `out`.

    Args:
        calibration: the text (and windows) for methods that calibrate; None: the method's default.
        original: the model `source` was made from, for methods that read it (heal's teacher,
            delta's base); default `source` itself.
    Returns:
        The written folder.
    """
    method = method_for(config)
    out = prepare_out(out, overwrite)
    source = DEFAULT_MODEL if source is None else str(source)
    context = Context(calibration=calibration, seed=seed, progress=progress, overwrite=overwrite,
                      original=str(original) if original is not None else source)
    method.run(source, config, out, context)
    return out
