"""Running a recipe: each step reads the previous step's folder and writes its own into the run folder.

    OUT/
      run.json              state: the recipe, each finished step (config, folder, seconds, weight bytes),
                            the original's weight bytes, evaluations
      steps/01-gptq/        each step's output, written whole (a crash leaves no half folder)
      model/                the final model: the last step's output plus llmshrink_recipe.json (how it
                            was made) and llmshrink_eval.json (its scores beside the original's)
      report.md  report.json  pareto.png

`resume=True` keeps every finished step whose config is unchanged and carries on after the last
one (evaluations already done are kept too). Each step runs its registered method's `run`
(llmshrink.methods: folder in, folder out); this file only walks the list.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import platform
import shutil
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import __version__
from ..config import MethodConfig
from ..errors import Interrupted, UsageError
from ..formats import weight_bytes
from ..hub import EVAL_FILE, RECIPE_FILE
from ..io import atomic_dir, atomic_write_json, fingerprint, fingerprint_change, prepare_out
from ..methods import Context, method_for
from ..models import resolve_model
from .recipe import STATE_FILE, Recipe, output_kinds
from .report import evaluate_run, final_label, write_report

__all__ = ["RECIPE_FILE", "STATE_FILE", "run_recipe", "step_folder", "versions"]

logger = logging.getLogger(__name__)

def versions() -> dict[str, str]:
    """The versions a run records (read from the installed packages: importing peft would load
    bitsandbytes, which prints to stderr, just to read a string)."""
    return {"llmshrink": __version__, "torch": torch.__version__,
            **{name: importlib.metadata.version(name) for name in ("transformers", "peft", "accelerate")},
            "python": platform.python_version()}


def step_folder(out: Path, index: int, config: MethodConfig) -> Path:
    return out / "steps" / f"{index + 1:02d}-{config.METHOD}"


# ----------------------------------------------------------------------------- state

def _as_saved(data):
    """`data` as it reads back from run.json (tuples become lists), for comparisons with saved state."""
    return json.loads(json.dumps(data))


def _inputs(recipe: Recipe) -> dict:
    """Fingerprints of what the run reads (the model, a calibration file), for `resume`."""
    calib = recipe.calibration.source if recipe.calibration is not None else "wiki"
    return {"model": fingerprint(resolve_model(recipe.model)), "calibration": fingerprint(None if calib == "wiki" else calib)}


def _weight_bytes(model: str) -> int | None:
    """Bytes of the weight files a model needs as its format counts them (packed: as stored), or
    None for a model that is no local folder (a Hub id not yet downloaded)."""
    folder = Path(model)
    return weight_bytes(folder) if folder.is_dir() else None


def _load_state(out: Path, recipe: Recipe) -> dict:
    path = out / STATE_FILE
    if not path.is_file():
        raise UsageError(f"nothing to resume in {out} (no {STATE_FILE}); run without --resume")
    state = json.loads(path.read_text())
    old, new = state["recipe"], _as_saved(recipe.to_dict())
    for key in ("model", "seed", "calibration"):
        if old.get(key) != new[key]:
            raise UsageError(f"cannot resume {out}: the recipe's {key} changed since the run began "
                             f"({old.get(key)!r} -> {new[key]!r}); use a new out folder or drop --resume")
    inputs = _inputs(recipe)
    if "inputs" not in state:
        raise UsageError(f"cannot resume {out}: it was begun by an older llmshrink, which did not record its input; "
                         "drop --resume (with --overwrite) to start over")
    for key in ("model", "calibration"):
        change = fingerprint_change(state.get("inputs", {}).get(key, {}), inputs[key])
        if change:
            raise UsageError(f"cannot resume {out}: the recipe's {key} {change}; use a new out folder or drop --resume")
    if old.get("evaluate") != new["evaluate"] and state.get("evals"):
        logger.warning("the evaluate settings changed: every model is scored again")
        state["evals"] = {}
    return state


def _finished_steps(state: dict, recipe: Recipe, out: Path) -> int:
    """How many leading steps of `recipe` the saved state finished with the same config."""
    done = 0
    for i, step in enumerate(recipe.steps):
        saved = state["steps"][i] if i < len(state["steps"]) else None
        if saved is None or saved["config"] != _as_saved(step.to_dict()) or not step_folder(out, i, step).is_dir():
            break
        done += 1
    if done < len(state["steps"]):
        logger.warning("steps from %d on changed or are missing: running them again", done + 1)
    return done


def _write_state(out: Path, state: dict) -> None:
    atomic_write_json(out / STATE_FILE, state)


# ----------------------------------------------------------------------------- the run

def _final_model(out: Path, last: Path, recipe: Recipe, state: dict) -> Path:
    """OUT/model: the last step's files (hard links where possible) and how they were made."""
    record = {"recipe": recipe.to_dict(), "versions": state["versions"], "seed": recipe.seed,
              "steps": [{k: s[k] for k in ("method", "config", "seconds")} for s in state["steps"]]}
    with atomic_dir(out / "model") as tmp:  # records of an earlier run stay behind; new files are not links
        shutil.copytree(last, tmp, dirs_exist_ok=True, copy_function=_link_or_copy,
                        ignore=shutil.ignore_patterns(RECIPE_FILE, EVAL_FILE))
        atomic_write_json(tmp / RECIPE_FILE, record)
    return out / "model"


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def run_recipe(recipe: Recipe, resume: bool = False, overwrite: bool = False, progress: bool = True) -> dict:
    """Run every step of `recipe`, then evaluate and report. Returns the final state (run.json)."""
    out = Path(recipe.out).expanduser().resolve()  # steps record absolute paths (an adapter names its base)
    prepare_out(out, overwrite=True, flag="out")  # writable; what may be in it is checked below
    if resume:
        state = _load_state(out, recipe)
        done = _finished_steps(state, recipe, out)
        state["steps"] = state["steps"][:done]
        state["evals"] = {k: v for k, v in state.get("evals", {}).items()
                          if k == "original" or int(k.split(".")[0]) <= done}
    else:
        if out.exists() and any(out.iterdir()):
            if not (out / STATE_FILE).is_file():
                raise UsageError(f"{out} is not empty and is not an llmshrink run folder (no {STATE_FILE}); "
                                 "set out to a new or empty folder")
            if not overwrite:
                raise UsageError(f"{out} holds an earlier run; pass --resume to continue it, --overwrite to "
                                 "start over, or set another out")
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        state = {"recipe": recipe.to_dict(), "versions": versions(), "steps": [], "evals": {}, "inputs": _inputs(recipe)}
        done = 0
    state["recipe"] = recipe.to_dict()
    state.setdefault("original_weight_bytes", _weight_bytes(resolve_model(recipe.model)))
    _write_state(out, state)

    total, kinds = len(recipe.steps), output_kinds(recipe.steps)
    bar = tqdm(total=total, initial=done, desc="pipeline", unit="step", disable=not progress, position=0)
    src = recipe.model if done == 0 else str(step_folder(out, done - 1, recipe.steps[done - 1]))
    for i in range(done, total):
        step = recipe.steps[i]
        method, dest = method_for(step), step_folder(out, i, step)
        bar.set_description(f"pipeline: step {i + 1}/{total} {step.METHOD}")
        logger.info("step %d/%d: %s%s", i + 1, total, step.METHOD,
                    " (with calibration)" if method.calibrated(step) else "")
        running = state.get("running")
        if running is not None and (running["index"] != i or running["config"] != _as_saved(step.to_dict())):
            for leftover in (dest, dest.with_name(dest.name + ".partial"), dest.with_name(dest.name + ".checkpoint")):
                if leftover.exists():  # a crashed step's resume state, now for other settings
                    shutil.rmtree(leftover)
        elif dest.exists():
            shutil.rmtree(dest)  # written by a run that crashed before recording it
        state["running"] = {"index": i, "config": step.to_dict()}
        _write_state(out, state)
        torch.manual_seed(recipe.seed)
        started = time.perf_counter()
        try:
            method.run(src, step, dest, Context(calibration=recipe.calibration, seed=recipe.seed, progress=progress,
                                                original=recipe.model))
        except KeyboardInterrupt:
            raise Interrupted(f"the finished steps are kept in {out}: run the same recipe with --resume to continue, "
                              "or with --overwrite to start over") from None
        state["steps"].append({"method": step.METHOD, "config": step.to_dict(), "folder": str(dest.relative_to(out)),
                               "kind": kinds[i], "seconds": round(time.perf_counter() - started, 1),
                               "weight_bytes": weight_bytes(dest)})
        state.pop("running")
        _write_state(out, state)
        src = str(dest)
        bar.update(1)
    bar.close()
    final = _final_model(out, Path(src), recipe, state)
    state["final"] = str(final.relative_to(out))
    _write_state(out, state)
    if recipe.evaluate is not None:
        evaluate_run(recipe, out, state, progress=progress)
        atomic_write_json(final / EVAL_FILE, {"original": state["evals"]["original"],
                                              "compressed": state["evals"][final_label(state)]})  # for the model card
    write_report(recipe, out, state)
    return state
