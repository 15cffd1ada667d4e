"""Run lm-evaluation-harness on exactly our data, to check that our numbers agree with it.

`write_task_configs` exports the first N documents of each task to JSON lines and writes lm-eval
task YAMLs that `include` lm-eval's own built-in task file (its prompts, choices, clean-up and
metrics) and only swap the dataset for ours (`dataset_path: json`). `run_lm_eval` runs lm-eval on
them in a subprocess. lm-eval is a test/bench dependency, never needed by the library itself.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

from .data import load_docs

__all__ = ["LM_EVAL_TASKS", "write_task_configs", "run_lm_eval"]

# our task -> lm-eval's built-in task file (relative to lm_eval/tasks) and task name
LM_EVAL_TASKS = {
    "piqa": "piqa/piqa.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "winogrande": "winogrande/default.yaml",
    "boolq": "super_glue/boolq/default.yaml",
    "lambada": "lambada/lambada_openai.yaml",
}


def _as_lm_eval_doc(task: str, doc: dict) -> dict:
    if task == "boolq":
        return {**doc, "label": int(bool(doc["answer"]))}
    if task == "lambada":
        return {"text": doc["context"] + doc["continuation"]}
    return doc


def write_task_configs(tasks: list[str], limit: int, folder: Path) -> list[str]:
    """Write `llmshrink_<task>.yaml` + data for each task into `folder`; return lm-eval task names."""
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("lm-eval is not installed; pip install lm-eval==0.4.13")
    builtin = Path(list(spec.submodule_search_locations)[0]) / "tasks"
    names = []
    for task in tasks:
        data = folder / f"{task}.jsonl"
        with open(data, "w") as f:
            for doc in load_docs(task, limit):
                f.write(json.dumps(_as_lm_eval_doc(task, doc)) + "\n")
        name = f"llmshrink_{task}"
        split = "test" if task == "lambada" else "validation"
        config = {
            "include": str(builtin / LM_EVAL_TASKS[task]),
            "task": name,
            "tag": [],
            "dataset_path": "json",
            "dataset_name": None,
            "dataset_kwargs": {"data_files": {split: str(data)}},
            "training_split": None,
            "validation_split": split if split == "validation" else None,
            "test_split": split if split == "test" else None,
            "fewshot_split": None,
        }
        (folder / f"{name}.yaml").write_text(json.dumps(config, indent=2))  # JSON is valid YAML
        names.append(name)
    return names


def run_lm_eval(model_path: str, tasks: list[str], limit: int, folder: Path, batch_size: int = 8,
                through_llmshrink: bool = False) -> dict:
    """Run lm-eval (hf backend, fp32, CPU) on our data; return {our task: {metric: value}}.
    `through_llmshrink`: as `llmshrink lm-eval` (llmshrink's formats loadable) instead of `lm_eval`."""
    names = write_task_configs(tasks, limit, folder)
    out = folder / "lm_eval_out"
    entry = ["-m", "llmshrink", "lm-eval"] if through_llmshrink else ["-m", "lm_eval"]
    cmd = [sys.executable, *entry, "--model", "hf",
           "--model_args", f"pretrained={model_path},dtype=float32", "--device", "cpu",
           "--include_path", str(folder), "--tasks", ",".join(names), "--batch_size", str(batch_size),
           "--output_path", str(out)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    result_file = max(out.rglob("results_*.json"), key=lambda p: p.stat().st_mtime)
    raw = json.loads(result_file.read_text())["results"]
    results = {}
    for task, name in zip(tasks, names):
        results[task] = {k.split(",")[0]: v for k, v in raw[name].items()
                         if "," in k and "stderr" not in k}
    return results
