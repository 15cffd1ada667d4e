"""Small file-system helpers: atomic folder writes, sizes, and output-path checks."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import UsageError

__all__ = ["atomic_dir", "atomic_write_json", "check_writable_file", "folder_size", "cache_dir"]


def cache_dir() -> Path:
    """Where llmshrink keeps converted models: `$LLMSHRINK_CACHE`, else ~/.cache/llmshrink."""
    root = os.environ.get("LLMSHRINK_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "llmshrink"
    )
    return Path(root)


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temp folder beside `final`; rename it into place only if the block succeeds.

    A crash or Ctrl-C leaves `final` untouched (absent or as it was) and removes the temp folder.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    umask = os.umask(0o022)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result should not be
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def check_writable_file(path: str | os.PathLike) -> Path:
    """Fail early, before any work, if `path` cannot be written as a file."""
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise UsageError(f"output path {p} is a folder; give a file name such as {p / 'results.json'}")
    if not parent.is_dir():
        raise UsageError(f"output folder {parent} does not exist; create it or choose another --output")
    if not os.access(parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise UsageError(f"cannot write {p}: permission denied; choose another --output")
    return p


def atomic_write_json(path: Path, obj: object) -> None:
    """Write JSON to a temp file beside `path`, then rename it into place."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=False)
            f.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def folder_size(path: str | os.PathLike, suffixes: tuple[str, ...] | None = None) -> int:
    """Total bytes of the files under `path` (only those ending in `suffixes`, if given)."""
    total = 0
    for p in Path(path).rglob("*"):
        if p.is_file() and (suffixes is None or p.name.endswith(suffixes)):
            total += p.stat().st_size
    return total
