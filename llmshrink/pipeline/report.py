"""Evaluating a run's models and writing its report: report.json, report.md and pareto.png.

Every model of the run (the original, each step's output when `evaluate.every_step`, and the
final model) is scored by `llmshrink eval`'s harness in a fresh process, so each one's peak
memory is its own. The plot puts perplexity against size on disk for all of them, with the
original marked, so the trade-off each step made can be read off at a glance.
"""

from __future__ import annotations

import logging
from pathlib import Path

import yaml
from tqdm.auto import tqdm

from ..evals.harness import EvalSpec, evaluate_in_fresh_process
from ..evals.report import print_table, to_markdown
from ..io import atomic_write_json
from .recipe import STATE_FILE, Recipe, plan_lines

__all__ = ["evaluate_run", "final_label", "pareto_points", "plot_pareto", "print_summary", "stage_sizes", "step_label",
           "write_report"]

logger = logging.getLogger(__name__)


def step_label(index: int, method: str) -> str:
    """How a step's output is named in scores and reports: "2. gptq" for steps[1]."""
    return f"{index + 1}. {method}"


def final_label(state: dict) -> str:
    return step_label(len(state["steps"]) - 1, state["steps"][-1]["method"])


def _models(recipe: Recipe, out: Path, state: dict) -> list[tuple[str, str]]:
    """(label, folder or name) of every model to score, in run order."""
    models = [("original", recipe.model)]
    last = len(state["steps"]) - 1
    for i, step in enumerate(state["steps"]):
        if recipe.evaluate.every_step or i == last:
            models.append((step_label(i, step["method"]), str(out / (state["final"] if i == last else step["folder"]))))
    return models


def evaluate_run(recipe: Recipe, out: Path, state: dict, progress: bool = True) -> None:
    """Score each model of the run not scored yet; results go into state["evals"] (and run.json)."""
    e = recipe.evaluate
    todo = [(label, model) for label, model in _models(recipe, out, state) if label not in state["evals"]]
    for label, model in tqdm(todo, desc="evaluate", unit="model", disable=not progress or not todo):
        spec = EvalSpec(model=model, tasks=tuple(e.tasks), limit=e.limit, seqlen=e.seqlen, protocol=e.protocol,
                        dtype=e.dtype, batch_tokens=e.batch_tokens, gen_tokens=e.gen_tokens, progress=False)
        record = evaluate_in_fresh_process(spec)
        record["model"] = label
        state["evals"][label] = record
        atomic_write_json(out / STATE_FILE, state)


def _ppl_task(record: dict) -> str | None:
    return next((t for t, m in record["results"].items() if "protocol" in m), None)


def pareto_points(state: dict) -> list[dict]:
    """[{label, size_mb, ppl}] for every scored model, in run order (needs a perplexity task)."""
    points = []
    for label, record in state["evals"].items():
        task = _ppl_task(record)
        if task is not None:
            points.append({"label": label, "size_mb": record["stats"]["size_mb"],
                           "ppl": record["results"][task]["ppl"], "task": task})
    return points


def plot_pareto(points: list[dict], path: Path, title: str) -> None:
    """Perplexity against size on disk; the original is a star, steps are joined in order."""
    import matplotlib  # lazy: a second of import time, for the one function that draws

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    xs, ys = [p["size_mb"] for p in points], [p["ppl"] for p in points]
    ax.plot(xs, ys, color="0.75", lw=1, zorder=1)
    for p in points:
        original = p["label"] == "original"
        ax.scatter(p["size_mb"], p["ppl"], s=160 if original else 50, marker="*" if original else "o",
                   color="tab:red" if original else "tab:blue", zorder=2)
        ax.annotate(p["label"], (p["size_mb"], p["ppl"]), textcoords="offset points", xytext=(6, 6), fontsize=8)
    ax.set_xlabel("size on disk (MB)")
    ax.set_ylabel(f"{points[0]['task']} perplexity (lower is better)")
    if max(ys) > 5 * min(ys):  # log scale only when the spread needs it (its tick labels are harder to read)
        ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.set_xlim(left=0)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def stage_sizes(state: dict) -> list[tuple[str, int | None]]:
    """(label, weight bytes or None where unknown) of the original and of each step's output, in
    run order: what every stage of the run weighs on disk, evaluated or not."""
    return [("original", state.get("original_weight_bytes"))] + [
        (step_label(i, s["method"]), s.get("weight_bytes")) for i, s in enumerate(state["steps"])]


def _mb(size: int | None) -> str:
    return "-" if size is None else f"{size / 2**20:.2f}"


def _markdown(recipe: Recipe, state: dict) -> str:
    lines = [f"# llmshrink run: {recipe.model} -> {state['final']}", "", "## Plan", "", "```",
             *plan_lines(recipe), "```", "", "## Steps", "", "| step | method | seconds | weights (MB) | output |",
             "|---|---|---|---|---|",
             f"| 0 | original | - | {_mb(state.get('original_weight_bytes'))} | {recipe.model} |"]
    lines += [f"| {i + 1} | {s['method']} | {s['seconds']:.0f} | {_mb(s.get('weight_bytes'))} | {s['folder']} "
              f"({s['kind']}) |" for i, s in enumerate(state["steps"])]
    evals = state.get("evals", {})
    if evals:
        lines += ["", "## Original against compressed", ""]
        if final_label(state) in evals:
            lines.append(to_markdown(evals["original"], evals[final_label(state)]))
        points = pareto_points(state)
        if points:
            lines += ["## Every model of the run", "", f"| model | size (MB) | {points[0]['task']} ppl |",
                      "|---|---|---|"]
            lines += [f"| {p['label']} | {p['size_mb']:.1f} | {p['ppl']:.3f} |" for p in points]
            lines += ["", "![perplexity against size](pareto.png)"]
    lines += ["", "## Recipe", "", "```yaml", yaml.safe_dump(recipe.to_dict(), sort_keys=False).rstrip(), "```",
              "", "## Versions", "", ", ".join(f"{k} {v}" for k, v in state["versions"].items()), ""]
    return "\n".join(lines)


def write_report(recipe: Recipe, out: Path, state: dict) -> None:
    """report.json, report.md and (when a perplexity task was scored) pareto.png in `out`."""
    atomic_write_json(out / "report.json", {k: state[k] for k in ("recipe", "versions", "original_weight_bytes",
                                                                  "steps", "final", "evals") if k in state})
    points = pareto_points(state)
    if points:
        plot_pareto(points, out / "pareto.png", f"{recipe.model}: {' -> '.join(s['method'] for s in state['steps'])}")
    elif state.get("evals"):
        logger.warning("no perplexity task was evaluated: pareto.png needs one (add wiki to evaluate.tasks)")
    tmp = out / ".report.md.tmp"
    tmp.write_text(_markdown(recipe, state))
    tmp.replace(out / "report.md")


def print_summary(state: dict) -> None:
    """The weights of every stage, then the side-by-side table of the original and the final
    model, in the terminal."""
    print("weights on disk: " + " -> ".join(f"{label} {_mb(size)} MB" for label, size in stage_sizes(state)))
    evals = state.get("evals", {})
    if "original" in evals and final_label(state) in evals:
        print_table(evals["original"], evals[final_label(state)])

