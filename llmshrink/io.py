"""Small file-system helpers: atomic folder writes, sizes, output-path checks and input fingerprints.

Every command that writes a folder calls `prepare_out` before any work (so a bad `--out` is a
one-line error, not a traceback after the work) and writes through `atomic_dir` (a temp folder
renamed into place; one left by a killed run is removed by the next run of the same output).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import UsageError

__all__ = ["atomic_dir", "atomic_write_json", "check_writable_file", "prepare_out", "folder_size", "cache_dir",
           "copy_tokenizer_files", "fingerprint", "fingerprint_change", "sha256_file", "tensor_sha256"]

logger = logging.getLogger(__name__)


def cache_dir() -> Path:
    """Where llmshrink keeps converted models: `$LLMSHRINK_CACHE`, else ~/.cache/llmshrink."""
    root = os.environ.get("LLMSHRINK_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "llmshrink"
    )
    return Path(root)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temps(final: Path) -> list[Path]:
    """Remove the temp folders of `final` left by runs that were killed (kill -9, power loss), whose
    `finally` never ran. A temp folder's name carries its writer's pid; one whose writer still
    runs is left alone. Returns the folders removed (each named in one log line)."""
    final = Path(final)
    pattern = re.compile(rf"^\.{re.escape(final.name)}\.tmp-(?:(\d+)-)?[^/]*$")
    removed = []
    if not final.parent.is_dir():
        return removed
    for entry in final.parent.iterdir():
        m = pattern.match(entry.name)
        if m and entry.is_dir() and not (m.group(1) and _alive(int(m.group(1)))):
            shutil.rmtree(entry, ignore_errors=True)
            logger.info("removed %s, a temp folder left by an interrupted run of the same output", entry)
            removed.append(entry)
    return removed


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temp folder beside `final`; rename it into place only if the block succeeds.

    A crash or Ctrl-C leaves `final` untouched (absent or as it was) and removes the temp folder;
    a temp folder a killed run could not remove is removed here, by the next run.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=final.parent))
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


def check_writable_file(path: str | os.PathLike, flag: str = "--output") -> Path:
    """Fail early, before any work, if `path` cannot be written as a file."""
    p = Path(path).expanduser()
    parent = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise UsageError(f"{flag} {p} is a folder; give a file name such as {p / 'results.json'}")
    if not parent.is_dir():
        raise UsageError(f"{flag} folder {parent} does not exist; create it or choose another {flag}")
    why = _probe_writable(parent)
    if why or (p.exists() and not os.access(p, os.W_OK)):
        raise UsageError(f"cannot write {flag} {p}: {why or 'permission denied'}; choose another {flag}")
    return p


def _probe_writable(folder: Path) -> str | None:
    """Why files cannot be created in the existing folder `folder`, or None if they can. Tries it
    (os.access says yes to root on a read-only mount or a protected file system)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".llmshrink-probe-", dir=folder)
    except OSError as e:
        return e.strerror or str(e)
    os.close(fd)
    os.unlink(probe)
    return None


def prepare_out(out: str | os.PathLike, overwrite: bool = False, flag: str = "--out") -> Path:
    """Check, before any work, that `out` can be written as an output folder; returns it as a Path.

    Refused with a one-line UsageError: a path that is a file, a non-empty folder without
    `overwrite`, a parent that is a file, and a place where nothing can be created (read-only or
    no permission). Creates nothing.
    """
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise UsageError(f"{flag} {out} is a file; give a folder path for {flag}")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"{out} exists and is not empty; choose another {flag} or pass --overwrite")
    existing = out if out.is_dir() else out.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"cannot write {flag} {out}: {existing} is a file, not a folder; choose another {flag}")
    why = _probe_writable(existing)
    if why:
        raise UsageError(f"cannot write {flag} {out}: {existing} is not writable ({why}); choose another {flag}")
    return out


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


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            sha.update(block)
    return sha.hexdigest()


def tensor_sha256(tensor) -> str:
    """Hex sha256 of a CPU tensor's bytes (calibration windows, for a resumed run to compare)."""
    return hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()


def _header_sha(path: Path) -> str | None:
    """sha256 of a safetensors file's header (names, dtypes, shapes, offsets), or None if unreadable."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            return hashlib.sha256(f.read(min(n, 100 << 20))).hexdigest()
    except OSError:
        return None


def fingerprint(path: str | os.PathLike | None) -> dict:
    """What a resumed run must find unchanged in an input: per file, its size and mtime, and for
    safetensors files the header's sha256 (a folder: its config, weights and index; a file: itself).
    Cheap: no tensor is read. A Hub id or None gives {}."""
    if path is None or not Path(path).exists():
        return {}
    p = Path(path)
    files = [p] if p.is_file() else sorted(f for f in p.iterdir() if f.is_file() and (
        f.suffix == ".safetensors" or f.name in ("config.json", "model.safetensors.index.json",
                                                 "adapter_config.json") or f.name.startswith("llmshrink_")))
    out = {}
    for f in files:
        st = f.stat()
        entry = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
        if f.suffix == ".safetensors":
            entry["header_sha256"] = _header_sha(f)
        out[f.name] = entry
    return out


def fingerprint_change(saved: dict, now: dict) -> str | None:
    """A few words on the most telling difference between two fingerprints (tensor files before
    the others, a changed layout before a changed size or time), or None if they are equal."""
    names = sorted(set(saved) | set(now), key=lambda n: (not n.endswith(".safetensors"), n))
    for name in names:
        if name not in now or name not in saved:
            return f"{name} is {'gone' if name not in now else 'new'}"
    for key, what in (("header_sha256", "tensor layout"), ("size", "size"), ("mtime_ns", "modification time")):
        for name in names:
            if saved[name].get(key) != now[name].get(key):
                return f"{name} has changed since the run began (its {what} differs)"
    return None


TOKENIZER_FILES = ("tokenizer", "special_tokens", "chat_template", "vocab", "merges")  # name prefixes


def copy_tokenizer_files(source: str | os.PathLike, dest: str | os.PathLike) -> list[str]:
    """Copy the tokenizer files of folder `source` into `dest`; their names (none for a folder without)."""
    copied = []
    for f in sorted(Path(source).iterdir()):
        if f.is_file() and f.name.startswith(TOKENIZER_FILES):
            shutil.copy2(f, Path(dest) / f.name)
            copied.append(f.name)
    return copied
