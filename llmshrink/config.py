"""Method configs and the registry that maps each config type to the function that applies it.

Every compression method is one small `@dataclass` subclassing `MethodConfig`, with a `METHOD`
name and a `VERSION`. Configs round-trip through JSON (`to_dict` / `config_from_dict`): unknown
keys warn and name the nearest known key, unknown methods and newer versions fail clearly.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
from typing import Any, Callable, ClassVar

from .errors import UsageError

__all__ = ["MethodConfig", "register_method", "config_from_dict", "METHODS"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class MethodConfig:
    """Base of all method configs. Subclasses set METHOD and VERSION and may override `validate`."""

    METHOD: ClassVar[str] = ""
    VERSION: ClassVar[int] = 1

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise UsageError naming the bad field, the expected values and the fix."""

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.METHOD, "version": self.VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MethodConfig":
        data = dict(data)
        method = data.pop("method", cls.METHOD)
        version = data.pop("version", cls.VERSION)
        if method != cls.METHOD:
            raise UsageError(f"config is for method '{method}', not '{cls.METHOD}'")
        if not isinstance(version, int) or version > cls.VERSION:
            raise UsageError(f"'{method}' config version {version} is newer than this llmshrink understands "
                             f"(version {cls.VERSION}); upgrade llmshrink")
        names = [f.name for f in dataclasses.fields(cls)]
        for key in [k for k in data if k not in names]:
            near = difflib.get_close_matches(key, names, n=1)
            logger.warning("ignoring unknown '%s' key '%s'%s", method, key,
                           f"; did you mean '{near[0]}'?" if near else "")
            data.pop(key)
        return cls(**data)


# method name -> (config class, apply function)
METHODS: dict[str, tuple[type[MethodConfig], Callable]] = {}


def register_method(config_cls: type[MethodConfig]) -> Callable[[Callable], Callable]:
    """Decorator: `@register_method(GPTQConfig)` on the function that applies GPTQConfig."""

    def wrap(fn: Callable) -> Callable:
        if config_cls.METHOD in METHODS:
            raise ValueError(f"method '{config_cls.METHOD}' is already registered")
        METHODS[config_cls.METHOD] = (config_cls, fn)
        return fn

    return wrap


def config_from_dict(data: dict[str, Any]) -> MethodConfig:
    """Rebuild any registered method's config from its `to_dict` form."""
    method = data.get("method")
    if method not in METHODS:
        near = difflib.get_close_matches(str(method), list(METHODS), n=1)
        raise UsageError(f"unknown method '{method}'" + (f"; did you mean '{near[0]}'?" if near else "")
                         + f"; known: {', '.join(sorted(METHODS)) or 'none'}")
    return METHODS[method][0].from_dict(data)
