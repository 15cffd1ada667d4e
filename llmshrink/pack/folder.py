"""Lossless packing of checkpoint folders (`llmshrink pack` / `llmshrink unpack`, see cli.py).

`pack_folder` entropy-codes every safetensors file of a folder (single file or sharded, written
by anyone) with the byte-plane + zstd codec of `llmshrink.pack.codec`; `unpack_folder` gives
back the original files byte for byte (every chunk checked against its recorded sha256 as it is
decoded; `verify="both"`, `llmshrink unpack --verify-file`, also recomputes each file's sha256).
A packed folder:

    llmshrink_pack.json               the manifest (below)
    <path>.safetensors.llmpack        one container per safetensors file, at the same relative path
    everything else                   copied as is: config.json, tokenizer files, the shard index, ...

    manifest = {"format": "llmshrink-pack", "version": 1, "level": zstd level used,
                "files": {"model.safetensors": {"packed": "model.safetensors.llmpack",
                                                "size": bytes, "sha256": hex, "packed_size": bytes}},
                "copied": {"config.json": {"size": bytes, "sha256": hex}, ...}}

(Packs written before the copied files had a sha256 list only their sizes, `"config.json": bytes`;
those are checked by size.)

The original sha256 is the one the Hugging Face Hub shows for a safetensors (LFS) file: the file's
identity, checked against each container's table before decoding. A manifest of a newer format
version is refused with a clear message. Loaders call `materialize(folder)`, which decodes a
packed folder once into llmshrink's cache and returns the plain folder there.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock
from tqdm.auto import tqdm

from ..errors import UsageError
from ..io import atomic_dir, cache_dir, prepare_out, sha256_file
from .codec import DEFAULT_LEVEL, FORMAT, VERIFY, VERSION, decode_to_file, encode_file, read_table
from .config import PackConfig

__all__ = ["MANIFEST", "SUFFIX", "PackSummary", "pack", "pack_folder", "unpack_folder", "is_packed_folder",
           "materialize"]

log = logging.getLogger(__name__)

MANIFEST = "llmshrink_pack.json"
SUFFIX = ".llmpack"


@dataclass(frozen=True)
class PackSummary:
    """What a pack or unpack did: safetensors bytes before/after, whole-folder bytes, seconds."""

    out: Path
    files: int  # safetensors files coded
    tensor_bytes: int  # original safetensors bytes
    packed_bytes: int  # their containers' bytes
    folder_bytes_in: int
    folder_bytes_out: int
    seconds: float

    @property
    def ratio(self) -> float:
        return self.tensor_bytes / max(self.packed_bytes, 1)


def is_packed_folder(path: str | os.PathLike) -> bool:
    """True if `path` is a folder written by `pack_folder` (it holds llmshrink_pack.json)."""
    return (Path(path) / MANIFEST).is_file()


def _files(folder: Path) -> list[str]:
    """Relative paths of every file under `folder`, sorted."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def _check_out(src: Path, out: Path, overwrite: bool) -> None:
    s, o = src.resolve(), out.resolve()
    if s == o or s in o.parents or o in s.parents:
        raise UsageError(f"output {out} overlaps the input {src}; choose an --out outside it")
    prepare_out(out, overwrite)


def _verify_copied(src: Path, restored: Path, copied: dict) -> None:
    """Check every copied file given back against the manifest's sha256 (older packs: its size)."""
    for name, entry in copied.items():
        size, sha = (entry["size"], entry["sha256"]) if isinstance(entry, dict) else (entry, None)
        path = restored / name
        if path.stat().st_size != size or (sha is not None and sha256_file(path) != sha):
            raise UsageError(f"{src / name} does not match the sha256 recorded in {MANIFEST} when it was packed; "
                             "the folder is corrupt: copy it again or re-create it with 'llmshrink pack'")


def _safe_name(folder: Path, name: str) -> str:
    if not isinstance(name, str) or Path(name).is_absolute() or ".." in Path(name).parts:
        raise UsageError(f"{folder / MANIFEST} names a file outside the folder ({name!r}); it is corrupt")
    return name


def _copy(src: Path, out: Path, names: list[str]) -> None:
    for name in names:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / name, out / name)


def pack(src: str | os.PathLike, config: PackConfig, out: str | os.PathLike, overwrite: bool = False,
         progress: bool = False) -> PackSummary:
    """`pack_folder` with the settings of a PackConfig."""
    return pack_folder(src, out, level=config.level, threads=config.threads, overwrite=overwrite, progress=progress)


def pack_folder(src: str | os.PathLike, out: str | os.PathLike, level: int = DEFAULT_LEVEL, threads: int | None = None,
                overwrite: bool = False, progress: bool = False) -> PackSummary:
    """Losslessly compress every safetensors file of `src` into a packed folder `out`.

    Args:
        src: a checkpoint folder with at least one .safetensors file (in it or below it).
        out: the packed folder to write (written beside, then renamed into place).
        level: zstd level of the match-finding candidate per chunk (1-22; 0 = Huffman literals only).
        threads: coding threads (default os.cpu_count()).
        overwrite: replace an existing non-empty `out`.
        progress: show a progress bar over the bytes coded.
    Returns:
        A PackSummary (sizes, ratio, seconds).
    """
    src, out = Path(src), Path(out)
    started = time.perf_counter()
    if not src.is_dir():
        raise UsageError(f"{src} is not a folder; give the checkpoint folder that holds the .safetensors files")
    if is_packed_folder(src):
        raise UsageError(f"{src} is already packed (it has {MANIFEST}); use 'llmshrink unpack' to restore it")
    if not 0 <= level <= 22:
        raise UsageError(f"level={level} is not a zstd level; use 1-22, or 0 for Huffman literals only")
    if threads is not None and threads < 1:
        raise UsageError(f"threads={threads}; use a positive number (default: all {os.cpu_count()} CPUs)")
    names = _files(src)
    coded = [n for n in names if n.endswith(".safetensors")]
    if not coded:
        raise UsageError(f"{src} has no .safetensors file to pack; llmshrink packs safetensors checkpoints "
                         "(re-save the model with save_pretrained(safe_serialization=True))")
    copied = [n for n in names if n not in coded]
    if clash := [n for n in copied if n.endswith(SUFFIX)]:
        raise UsageError(f"{src} already holds packed files ({clash[0]}); give the original checkpoint folder")
    _check_out(src, out, overwrite)
    total = sum((src / n).stat().st_size for n in coded)
    manifest = {"format": FORMAT, "version": VERSION, "level": level, "files": {}, "copied": {}}
    with atomic_dir(out) as tmp, tqdm(total=total, unit="B", unit_scale=True, desc="pack",
                                      disable=not progress) as bar:
        for name in coded:
            bar.set_postfix_str(name)
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            entry = encode_file(src / name, tmp / (name + SUFFIX), level=level, threads=threads, progress=bar.update)
            manifest["files"][name] = {"packed": name + SUFFIX, **entry}
        _copy(src, tmp, copied)
        manifest["copied"] = {n: {"size": (tmp / n).stat().st_size, "sha256": sha256_file(tmp / n)} for n in copied}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")  # tmp is renamed whole
        folder_out = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
    packed = sum(e["packed_size"] for e in manifest["files"].values())
    summary = PackSummary(out, len(coded), total, packed, total + sum(e["size"] for e in manifest["copied"].values()), folder_out,
                          time.perf_counter() - started)
    log.info("packed %s: %d safetensors bytes -> %d (%.3fx)", src, total, packed, summary.ratio)
    return summary


def _read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not folder.is_dir():
        raise UsageError(f"{folder} is not a folder; give a folder written by 'llmshrink pack'")
    if not path.is_file():
        raise UsageError(f"{folder} is not a packed folder (no {MANIFEST}); give a folder written by 'llmshrink pack'")
    try:
        manifest = json.loads(path.read_text())
        ok = manifest.get("format") == FORMAT and isinstance(manifest.get("version"), int)
    except (ValueError, AttributeError):
        ok = False
    if not ok:
        raise UsageError(f"{path} is not an llmshrink pack manifest; it may be corrupt: re-create the folder "
                         "with 'llmshrink pack'")
    if manifest["version"] > VERSION:
        raise UsageError(f"{folder} was packed by a newer llmshrink (pack format version {manifest['version']}; "
                         f"this one reads up to {VERSION}); upgrade llmshrink to unpack it")
    return manifest


def unpack_folder(src: str | os.PathLike, out: str | os.PathLike, threads: int | None = None,
                  overwrite: bool = False, progress: bool = False, verify: str = "chunks") -> PackSummary:
    """Restore the original checkpoint folder from a packed folder, byte for byte.

    Args:
        src: a folder written by `pack_folder`.
        out: the folder to write (written beside, then renamed into place).
        threads: decoding threads (default os.cpu_count()).
        overwrite: replace an existing non-empty `out`.
        progress: show a progress bar over the bytes decoded.
        verify: "chunks" (default): check every chunk against its recorded sha256, on the decoding
            threads; "both": also recompute each whole file's sha256 (sequential, ~0.55 CPU s/GB);
            "file": only the latter.
    Returns:
        A PackSummary (sizes, ratio, seconds).
    Raises:
        UsageError: a container or the manifest is missing, truncated or corrupt, or a check fails
            (nothing is written).
    """
    src, out = Path(src), Path(out)
    started = time.perf_counter()
    manifest = _read_manifest(src)
    if threads is not None and threads < 1:
        raise UsageError(f"threads={threads}; use a positive number (default: all {os.cpu_count()} CPUs)")
    if verify not in VERIFY:
        raise UsageError(f"verify={verify!r} is not a check; use one of {', '.join(VERIFY)}")
    _check_out(src, out, overwrite)
    try:
        files = {_safe_name(src, n): (_safe_name(src, e["packed"]), e) for n, e in manifest["files"].items()}
        listed = [_safe_name(src, n) for n in manifest["copied"]]
        total = sum(e["size"] for _, e in files.values())
    except (KeyError, TypeError, AttributeError) as e:
        raise UsageError(f"{src / MANIFEST} is malformed ({e!r}); re-create the folder with 'llmshrink pack'") from None
    packed_names = {p for p, _ in files.values()}
    present = [n for n in _files(src) if n != MANIFEST and n not in packed_names]
    if missing := [n for n in [p for p, _ in files.values()] + listed if not (src / n).is_file()]:
        raise UsageError(f"packed folder {src} is incomplete: {missing[0]} (listed in {MANIFEST}) is missing; "
                         "copy the whole folder again")
    packed = 0
    with atomic_dir(out) as tmp, tqdm(total=total, unit="B", unit_scale=True, desc="unpack",
                                      disable=not progress) as bar:
        for name, (packed_name, entry) in files.items():
            bar.set_postfix_str(name)
            table = read_table(src / packed_name)
            if (table["size"], table["sha256"]) != (entry["size"], entry["sha256"]):
                raise UsageError(f"{src / packed_name} does not match {MANIFEST} (size or sha256 differ); "
                                 "the folder mixes files of two packs: re-create it with 'llmshrink pack'")
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            decode_to_file(src / packed_name, tmp / name, threads=threads, progress=bar.update, verify=verify)
            packed += (src / packed_name).stat().st_size
        _copy(src, tmp, present)
        _verify_copied(src, tmp, manifest["copied"])
        folder_out = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
    folder_in = sum((src / n).stat().st_size for n in _files(src))
    log.info("unpacked %s: %d -> %d safetensors bytes", src, packed, total)
    return PackSummary(out, len(files), total, packed, folder_in, folder_out, time.perf_counter() - started)


def _cache_key(folder: Path) -> str:
    """sha256 of the manifest and of every other non-container file: editing config.json in a
    packed folder gives a new cache entry instead of a stale one."""
    manifest = _read_manifest(folder)
    packed = {e["packed"] for e in manifest["files"].values()}
    sha = hashlib.sha256((folder / MANIFEST).read_bytes())
    for name in _files(folder):
        if name != MANIFEST and name not in packed:
            sha.update(name.encode() + b"\0")
            sha.update(sha256_file(folder / name).encode())
    return sha.hexdigest()


def materialize(path: str | os.PathLike, threads: int | None = None, progress: bool = False) -> Path:
    """The plain checkpoint folder of a packed folder, decoded once into the cache.

    Decodes into `cache_dir()/unpacked/<key>` (atomically, under a file lock, so concurrent
    loaders decode once) and reuses it afterwards. The key hashes the manifest and the copied files.

    Args:
        path: a folder written by `pack_folder`.
        threads: decoding threads (default os.cpu_count()).
        progress: show a progress bar while decoding.
    Returns:
        The decoded folder (load it with from_pretrained like any checkpoint folder).
    """
    folder = Path(path)
    out = cache_dir() / "unpacked" / _cache_key(folder)
    if out.is_dir():  # complete: atomic_dir renames a finished folder into place
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if not out.is_dir():  # another process may have finished it meanwhile
            log.info("decoding packed checkpoint %s into %s", folder, out)
            unpack_folder(folder, out, threads=threads, progress=progress)
    return out
