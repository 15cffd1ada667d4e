"""The score map (`save_scores`): what cutting the model at any ratio needs, measured once.

A folder of
  scores.json   {"format": "llmshrink-factorize-scores", "version": 1,
                 "source": {"name", "sha256"} (`tensors_sha256` of the model scored),
                 "calibration": where the windows came from, "whiten", "damp", "targets",
                 "linears": {name: {"shape": [out, in], "max_rank": k, "energy": sum sigma^2,
                                    "file": its layer's file}}}
  scores-00000.safetensors, one per decoder layer, for each scored linear:
    `<name>.U` [out, k] float32 and `<name>.V` [k, in] float32: the balanced whitened factors
        (`truncate`) at k = the largest rank that still saves parameters; their first r columns
        and rows are exactly the rank-r factors, so a cut slices them;
    `<name>.importance` [min(out, in)] float64: sigma_i^2 / sum sigma^2 of every direction,
        the relative output error each adds when dropped (the scale the allocator weighs).
The map is written to a temp folder and renamed into place; a cut reads its JSON first, so a
missing map, another format version, or a map of another model is refused before any work.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch

from ..errors import UsageError
from ..safetensors_io import TensorIndex, save_tensors, tensors_sha256
from .allocate import max_saving_rank
from .config import FactorizeConfig
from .whiten import direction_importance, error_curve, truncate

__all__ = ["FORMAT", "META_FILE", "ScoreMap", "VERSION", "check_scores", "check_source", "layer_file", "read_scores",
           "source_identity", "write_layer", "write_meta"]

FORMAT = "llmshrink-factorize-scores"
VERSION = 1
META_FILE = "scores.json"


def layer_file(i: int) -> str:
    return f"scores-{i:05d}.safetensors"


def write_layer(folder: Path, i: int, svds) -> dict[str, dict]:
    """Write decoder layer `i`'s scores to `folder`; returns each linear's scores.json entry.

    Args:
        svds: (name, (P [out, k], sigma [k], B [k, in])) of each linear (`whitened_svd`).
    """
    tensors, entries = {}, {}
    for name, (P, sigma, B) in svds:
        shape = (P.shape[0], B.shape[1])
        rank = max_saving_rank(shape)
        importance, energy = direction_importance(sigma)
        tensors[f"{name}.importance"] = importance
        if rank > 0:  # a linear no rank can shrink stays dense: no factors
            U, V = truncate(P, sigma, B, rank)
            tensors[f"{name}.U"], tensors[f"{name}.V"] = U.float(), V.float()
        entries[name] = {"shape": list(shape), "max_rank": rank, "energy": energy, "file": layer_file(i)}
    if tensors:
        save_tensors(tensors, folder / layer_file(i))
    return entries


def write_meta(folder: Path, source: dict, calibration: dict | None, config: FactorizeConfig,
               linears: dict[str, dict]) -> None:
    meta = {"format": FORMAT, "version": VERSION, "source": source, "calibration": calibration,
            "whiten": config.whiten, "damp": config.damp, "targets": config.targets, "linears": linears}
    (folder / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")


def source_identity(model, source_sha256: str | None = None) -> dict:
    """{"name", "sha256"} of the model's folder: `source_sha256` if given, else the
    `tensors_sha256` of `model.name_or_path`, which must then be a local folder."""
    name = str(getattr(model, "name_or_path", "") or "")
    if source_sha256 is None:
        if not (name and Path(name).is_dir()):
            raise UsageError(f"a score map is tied to its model by the hash of the model's folder, and this model's "
                             f"name_or_path {name!r} is not a local folder; pass source_sha256=tensors_sha256(folder)")
        source_sha256 = tensors_sha256(name)
    return {"name": name, "sha256": source_sha256}


@dataclasses.dataclass
class ScoreMap:
    """A score map read back: its scores.json, and its tensors loaded on demand."""

    path: Path
    meta: dict
    index: TensorIndex

    @property
    def linears(self) -> dict[str, dict]:
        return self.meta["linears"]

    def curve(self, name: str, relative: bool = True) -> torch.Tensor:
        """[min(out, in) + 1] output error of `name` at every rank (relative, or absolute)."""
        return error_curve(self.index.get(f"{name}.importance"), self.linears[name]["energy"], relative)

    def factors(self, name: str, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(U [out, rank], V [rank, in]) float32, sliced from the stored factors."""
        if not 0 < rank <= self.linears[name]["max_rank"]:
            raise UsageError(f"{self.path} holds {name}'s factors up to rank {self.linears[name]['max_rank']}, "
                             f"not {rank}")
        U, V = self.index.get(f"{name}.U"), self.index.get(f"{name}.V")
        return U[:, :rank].contiguous(), V[:rank].contiguous()


def _rescore(path: Path) -> str:
    return f"write one with `llmshrink factorize --model MODEL --save-scores {path}`"


def read_scores(path: str | os.PathLike) -> ScoreMap:
    """The score map at `path` (its JSON read and checked, its tensors opened, none loaded), or a
    one-line UsageError: missing, not a score map, another format version, incomplete."""
    path = Path(path)
    if not path.is_dir():
        what = "does not exist" if not path.exists() else "is a file, not the folder save_scores writes"
        raise UsageError(f"score map {path} {what}; {_rescore(path)}")
    try:
        meta = json.loads((path / META_FILE).read_text())
    except FileNotFoundError:
        raise UsageError(f"{path} is not a score map (it has no {META_FILE}); {_rescore(path)}") from None
    except (OSError, ValueError) as e:
        raise UsageError(f"{path / META_FILE} cannot be read ({e}); {_rescore(path)}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise UsageError(f"{path / META_FILE} is not a factorize score map (format {found!r}, expected '{FORMAT}'); "
                         f"{_rescore(path)}")
    version = meta.get("version")
    if version != VERSION:
        fix = "upgrade llmshrink" if isinstance(version, int) and version > VERSION else \
            f"score the model again: {_rescore(path)}"
        raise UsageError(f"score map {path} has format version {version!r}; this llmshrink reads version {VERSION}: "
                         f"{fix}")
    missing = [k for k in ("source", "calibration", "whiten", "damp", "targets", "linears") if k not in meta]
    files = sorted({entry.get("file") for entry in meta.get("linears", {}).values()
                    if isinstance(entry, dict) and entry.get("file")})
    absent = [f for f in files if not (path / f).is_file()]
    if missing or absent:
        what = f"its {META_FILE} lacks '{missing[0]}'" if missing else f"{absent[0]} is missing"
        raise UsageError(f"score map {path} is incomplete ({what}); score the model again: {_rescore(path)}")
    return ScoreMap(path=path, meta=meta, index=TensorIndex(path, files=files))


def check_scores(scores: ScoreMap, config: FactorizeConfig, shapes: dict[str, tuple[int, int]]) -> None:
    """A UsageError where a cut's `config` contradicts the map, or the linears it chooses
    (`shapes`: name -> (out, in)) are not the map's."""
    for field in ("whiten", "damp"):
        if scores.meta[field] != getattr(config, field):
            raise UsageError(f"score map {scores.path} was measured with {field}={scores.meta[field]!r}, and a cut "
                             f"takes the map's; {field}={getattr(config, field)!r} contradicts it: leave {field} at "
                             f"{scores.meta[field]!r} or score again")
    missing = [n for n in shapes if n not in scores.linears]
    if missing:
        targets = scores.meta["targets"]
        raise UsageError(f"score map {scores.path} holds no scores for {missing[0]} (it was measured with "
                         f"targets={targets!r}); give targets={targets!r} or a pattern that finds fewer of its linears")
    for name, shape in shapes.items():
        if tuple(scores.linears[name]["shape"]) != tuple(shape):
            raise UsageError(f"score map {scores.path} scored {name} as {tuple(scores.linears[name]['shape'])}, but it "
                             f"is {tuple(shape)} in this model; the map is of another model")


def check_source(scores: ScoreMap, source: dict) -> None:
    """A UsageError, naming both models, when `source` (`source_identity`) is not the model scored."""
    made = scores.meta["source"]
    if made.get("sha256") != source["sha256"]:
        raise UsageError(f"score map {scores.path} was made from {made.get('name')} (tensors sha256 "
                         f"{str(made.get('sha256'))[:16]}...), not from {source['name']} (sha256 "
                         f"{source['sha256'][:16]}...); cut it with that model, or score this one with save_scores "
                         "(--save-scores)")
