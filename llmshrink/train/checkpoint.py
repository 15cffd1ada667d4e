"""Resumable training checkpoints, written with safetensors and JSON only: nothing is ever unpickled.

A checkpoint folder (for `llmshrink heal`: `OUT.checkpoint`, beside OUT) holds:

- `adapter/`: the trained model's `save_pretrained` (for heal a peft adapter);
- `optimizer.safetensors`: the optimizer state, one tensor per `state.{param index}.{key}`;
- `rng-{rank}.safetensors`: each process's torch RNG state (`cpu`, and `cuda` where there is one);
- `state.json`: the caller's record, the step, the losses and evals so far and the optimizer's
  param_groups. It is written last and atomically: the checkpoint counts once it is in place.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from ..config import MethodConfig
from ..errors import UsageError

__all__ = ["MODEL_FOLDER", "STATE", "checkpoint_dir", "load_optimizer", "optimizer_tensors", "read_checkpoint",
           "restore_checkpoint", "save_checkpoint"]

MODEL_FOLDER = "adapter"
STATE = "state.json"


def checkpoint_dir(out: str | os.PathLike) -> Path:
    """The resume folder of `out`: the sibling `OUT.checkpoint`."""
    out = Path(out)
    return out.with_name(out.name + ".checkpoint")


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state as (safetensors dict, json dict)."""
    sd = optimizer.state_dict()
    tensors = {f"state.{i}.{k}": v.detach().cpu().contiguous() for i, st in sd["state"].items() for k, v in st.items()}
    return tensors, {"param_groups": sd["param_groups"]}


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Put back the state `optimizer_tensors` returned."""
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        _, i, k = key.split(".", 2)
        state.setdefault(int(i), {})[k] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _rng_tensors() -> dict[str, torch.Tensor]:
    out = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def save_checkpoint(folder: Path, accelerator: Accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    step: int, meta: dict) -> None:
    """Every process writes its RNG state; the main process writes the model, the optimizer and state.json last.

    Args:
        folder: the checkpoint folder, created if missing.
        accelerator: the run's accelerator; `model` and `optimizer` are as it prepared them.
        step: optimizer steps done.
        meta: what state.json records besides `step` and `optimizer`.
    """
    state_dict = accelerator.get_state_dict(model)  # collective under FSDP
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    save_file(_rng_tensors(), str(folder / f"rng-{accelerator.process_index}.safetensors"))
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(folder / MODEL_FOLDER, state_dict=state_dict)
        tensors, opt_meta = optimizer_tensors(optimizer)
        save_file(tensors, str(folder / "optimizer.safetensors"))
        tmp = folder / (STATE + ".tmp")
        tmp.write_text(json.dumps({**meta, "step": step, "optimizer": opt_meta}, indent=1) + "\n")
        os.replace(tmp, folder / STATE)  # the checkpoint counts once state.json is in place
    accelerator.wait_for_everyone()


def read_checkpoint(folder: Path, config: MethodConfig, world: int) -> dict:
    """state.json of a checkpoint made with the same `config` on as many processes.

    Raises:
        UsageError: there is no checkpoint, or it was made with other settings or another process count.
    """
    path = folder / STATE
    if not path.is_file():
        raise UsageError(f"nothing to resume: {path} does not exist; run without --resume (and with "
                         "--save-every N to write checkpoints)")
    state = json.loads(path.read_text())
    saved = type(config).from_dict(state["config"])
    if saved != config:
        diff = [f"{f.name}={getattr(saved, f.name)!r}" for f in dataclasses.fields(config)
                if getattr(saved, f.name) != getattr(config, f.name)]
        raise UsageError(f"the checkpoint in {folder} was made with {', '.join(diff)}; resume with the same "
                         "settings or start over without --resume")
    if state["num_processes"] != world:
        raise UsageError(f"the checkpoint in {folder} was made on {state['num_processes']} processes, "
                         f"this run has {world}; resume on {state['num_processes']}")
    return state


def restore_checkpoint(folder: Path, optimizer: torch.optim.Optimizer, state: dict, rank: int) -> None:
    """Load the optimizer state and this process's RNG state of the checkpoint whose state.json is `state`."""
    load_optimizer(optimizer, load_file(str(folder / "optimizer.safetensors")), state["optimizer"])
    rng = load_file(str(folder / f"rng-{rank}.safetensors"))
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
