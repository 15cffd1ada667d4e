"""The `<out>.partial/` folder of a quantize run: what lets an interrupted run resume.

It holds each finished layer's tensors and stats (`layer-00000.safetensors`, `layer-00000.json`),
the next layer's calibration inputs (`inputs.safetensors`) and `state.json`: the run's identity
(source, its files, config, calibration windows) and how many layers are done. A run resumes
only with the same identity, so a resumed run writes the same checkpoint as an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..errors import UsageError
from ..io import fingerprint, fingerprint_change, tensor_sha256
from ..safetensors_io import StoredTensor, TensorIndex, save_tensors
from .config import GPTQConfig

__all__ = ["PartialRun", "run_identity"]


def run_identity(source: Path, config: GPTQConfig, calib_info: dict, calib: torch.Tensor) -> dict:
    """What a resumed run must share with the run that began the .partial folder."""
    return {"source": str(source.resolve()), "config": config.to_dict(), "calibration": calib_info,
            "calib_shape": list(calib.shape), "source_files": fingerprint(source),
            "calib_sha256": tensor_sha256(calib.long())}


class PartialRun:
    """The .partial folder beside `out`, resumed when it holds an unfinished run of `run`, else
    started empty (any other content is refused, or removed when it has no state)."""

    def __init__(self, out: Path, run: dict):
        self.folder = out.with_name(out.name + ".partial")
        self.run = run
        self._state = self.folder / "state.json"
        self.done, self.tuple_output = 0, False
        if self._state.is_file():
            state = json.loads(self._state.read_text())
            if state["run"] != run:
                raise UsageError(f"{self.folder} holds an unfinished run of other input "
                                 f"({_run_change(state['run'], run)}); delete it to start over, or use another --out")
            self.done = state["done_layers"]
            self.tuple_output = state.get("tuple_output", False)
        else:
            if self.folder.exists():
                shutil.rmtree(self.folder)
            self.folder.mkdir(parents=True)

    def saved_inputs(self) -> torch.Tensor:
        """[nsamples, seqlen, hidden] the next layer's calibration inputs, as saved."""
        return load_file(str(self.folder / "inputs.safetensors"))["hidden"]

    def save_layer(self, i: int, tensors: dict[str, torch.Tensor], stats: dict, outputs: list[torch.Tensor] | None,
                   tuple_output: bool) -> None:
        """Record layer `i` as done: its tensors and stats, and its outputs (the next layer's
        inputs) unless the run needs no activations; state.json last, atomically."""
        save_tensors(tensors, self.folder / f"layer-{i:05d}.safetensors")
        if outputs is not None:
            save_tensors({"hidden": torch.cat(outputs)}, self.folder / "inputs.safetensors")
        (self.folder / f"layer-{i:05d}.json").write_text(json.dumps(stats))
        tmp = self._state.with_name(".state.json.tmp")
        tmp.write_text(json.dumps({"run": self.run, "done_layers": i + 1, "tuple_output": tuple_output}))
        os.replace(tmp, self._state)

    def layer_tensors(self, i: int) -> dict[str, StoredTensor]:
        """Layer `i`'s saved tensors, left on disk until read."""
        layer_file = TensorIndex.of_file(self.folder / f"layer-{i:05d}.safetensors")
        return {key: StoredTensor(layer_file, key) for key in layer_file.keys()}

    def layer_stats(self, i: int) -> dict:
        return json.loads((self.folder / f"layer-{i:05d}.json").read_text())

    def remove(self, ignore_errors: bool = False) -> None:
        shutil.rmtree(self.folder, ignore_errors=ignore_errors)


def _run_change(saved: dict, now: dict) -> str:
    """What differs between the run recorded in a .partial folder and this one, in a few words."""
    if "source_files" not in saved:
        return "it was begun by an older llmshrink, which did not record its input"
    if saved.get("source") == now["source"]:
        change = fingerprint_change(saved["source_files"], now["source_files"])
        if change:
            return f"the source model's {change}"
    if saved.get("source") != now["source"]:
        return f"it quantized {saved.get('source')}"
    if saved.get("config") != now["config"]:
        return "other quantization settings"
    return "other calibration windows"
