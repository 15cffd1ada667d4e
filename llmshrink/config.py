"""The base of every method's config.

Every compression method is one small `@dataclass` subclassing `MethodConfig`, with a `METHOD`
name and a `VERSION`; its folder registers it with `llmshrink.methods.register`. Configs
round-trip through JSON (`to_dict` / `llmshrink.methods.config_from_dict`): unknown keys warn and
name the nearest known key, unknown methods and newer versions fail clearly.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
from typing import Any, ClassVar

from .errors import UsageError

__all__ = ["MethodConfig"]

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
