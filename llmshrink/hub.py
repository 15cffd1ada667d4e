"""Publishing: `llmshrink push DIR --repo-id ORG/NAME` uploads a model folder with a generated model card.

The card (README.md) has YAML metadata the Hub indexes (`base_model`, `library_name`, `tags`,
`pipeline_tag`) and a body with how the model was made (the pipeline recipe, from
llmshrink_recipe.json), its evaluation against the original (llmshrink_eval.json, written by
`llmshrink run`), its size, and how to load it in transformers, vLLM and llmshrink.

Upload goes through huggingface_hub (`create_repo`, then one `create_commit` with every file):
a commit lands whole or not at all, and files the repo already holds unchanged are skipped, so
re-running an interrupted push finishes it without a duplicate commit. The token comes from
huggingface_hub's usual places (HF_TOKEN, `hf auth login`) and is never printed or written.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import yaml
from huggingface_hub import CommitOperationAdd, HfApi, constants, get_token
from huggingface_hub.utils import HFValidationError, validate_repo_id

from .errors import UsageError
from .evals.report import to_markdown
from .formats import Format, detect
from .methods import load_builtin_methods
from .models import PACKAGED_MODELS

__all__ = ["EVAL_FILE", "add_cli", "model_card", "push_folder", "push_to_hub"]

logger = logging.getLogger(__name__)

EVAL_FILE = "llmshrink_eval.json"  # original vs compressed records, written by `llmshrink run`
RECIPE_FILE = "llmshrink_recipe.json"  # in a pipeline's final model folder: recipe, steps, versions, seed
SKIP = (".", "__pycache__")  # hidden files (temp files, .cache) and caches are never uploaded


# ----------------------------------------------------------------------------- the model card

def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _base_model(recipe: dict | None, folder: Path) -> str | None:
    """The Hub id of the model this one was made from, when it has one."""
    name = (recipe or {}).get("recipe", {}).get("model")
    if name is None:
        adapter = _read_json(folder / "adapter_config.json") or {}
        name = adapter.get("base_model_name_or_path")
    if name is None:
        return None
    if name.lower() in PACKAGED_MODELS:
        return PACKAGED_MODELS[name.lower()].hub_id or None
    local = Path(name).expanduser().exists() or name.startswith((".", "/", "~"))
    return None if local or name.count("/") != 1 else name  # only an ORG/NAME Hub id


def _kind(folder: Path, fmt: Format) -> tuple[str, list[str]]:
    """(library_name, tags): what the folder's format says of itself, and the tags of every method
    whose record its config.json carries."""
    library, tags = fmt.describe(folder)
    tags = ["llmshrink", *tags]
    config = _read_json(folder / "config.json") or {}
    for method in load_builtin_methods().values():
        if method.record is not None and method.record in config:
            tags += method.hub_tags
    return library, tags


def model_card(folder: str | os.PathLike, repo_id: str) -> str:
    """README.md text for the model in `folder`, to be published as `repo_id`."""
    folder = Path(folder)
    recipe, evals = _read_json(folder / RECIPE_FILE), _read_json(folder / EVAL_FILE)
    fmt = detect(folder)
    library, tags = _kind(folder, fmt)
    methods = load_builtin_methods()
    for step in (recipe or {}).get("steps", []):
        method = methods.get(step["method"])
        tags += method.hub_tags if method is not None else [step["method"]]
    meta = {"library_name": library, "pipeline_tag": "text-generation",
            "tags": sorted(set(tags), key=tags.index)}
    base = _base_model(recipe, folder)
    if base:
        meta["base_model"] = base
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "", f"# {repo_id.split('/')[-1]}", ""]
    made = f"from [{base}](https://huggingface.co/{base})" if base else "from its base model"
    lines.append(f"Compressed {made} with [llmshrink](https://github.com/llmshrink/llmshrink). "
                 f"Weights on disk: {fmt.weight_bytes(folder) / 2**20:.1f} MB.")
    if recipe:
        steps = " -> ".join(s["method"] for s in recipe["steps"])
        lines += ["", "## How it was made", "", f"Pipeline: {steps} (seed {recipe['seed']}; "
                  + ", ".join(f"{k} {v}" for k, v in recipe["versions"].items()) + ").", "",
                  "```yaml", yaml.safe_dump(recipe["recipe"], sort_keys=False).rstrip(), "```"]
    if evals:
        lines += ["", "## Evaluation against the original", "",
                  to_markdown(evals["original"], evals["compressed"]).rstrip()]
    else:
        lines += ["", "## Evaluation", "", "Not evaluated by llmshrink; run `llmshrink eval --model "
                  f"{repo_id} --compare {base or 'BASE'}` to compare."]
    lines += ["", "## How to load", "", "```python"]
    if fmt.unwrap is not None:  # the files are coded (packed): llmshrink decodes them
        lines += ["import llmshrink", "", f'model = llmshrink.AutoModelForCausalLM.from_pretrained("{repo_id}")']
    else:
        lines += ["import llmshrink  # registers llmshrink's formats (GPTQ, delta) with transformers",
                  "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")',
                  f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")']
    lines.append("```")
    if fmt.card_lines is not None:  # what the format adds (a GPTQ checkpoint: vLLM)
        lines += fmt.card_lines(folder, repo_id)
    lines += ["", "With llmshrink: `llmshrink.AutoModelForCausalLM.from_pretrained(\"" + repo_id + "\")` "
              "(every llmshrink output: GPTQ, pruned, adapters, deltas, packed).", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- pushing

def _check_repo_id(repo_id: str) -> None:
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise UsageError(f"repo id '{repo_id}' is not valid ({str(e).splitlines()[0].rstrip('.')}); "
                         "use ORG/NAME with letters, digits, '-', '_' and '.'") from None
    if "/" not in repo_id:
        raise UsageError(f"repo id '{repo_id}' has no owner; use ORG/NAME (your user name or an organization)")


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()
                  and not any(part.startswith(SKIP) for part in p.relative_to(folder).parts))


def push_folder(folder: str | os.PathLike, repo_id: str, private: bool = False, revision: str | None = None,
                token: str | None = None, commit_message: str | None = None) -> str:
    """Upload every file of `folder` and a generated README.md to the Hub repo `repo_id`.

    Args:
        folder: a model folder (an `llmshrink run` final model, a quantized/pruned checkpoint, ...).
        repo_id: ORG/NAME; created if it does not exist.
        private: create the repo private.
        revision: branch to commit to (default main).
        token: a Hub token (default: HF_TOKEN or the saved login).
    Returns:
        The URL of the commit (or of the repo when nothing changed).
    """
    folder = Path(folder)
    if constants.HF_HUB_OFFLINE:
        raise UsageError("the Hub is offline here (HF_HUB_OFFLINE=1); unset HF_HUB_OFFLINE (or set it to 0) "
                         "on a machine that reaches the Hub, then push again")
    if not (folder / "config.json").is_file() and not (folder / "adapter_config.json").is_file():
        raise UsageError(f"{folder} is not a model folder (no config.json or adapter_config.json); give the folder "
                         "an llmshrink command wrote, e.g. runs/quickstart/model")
    _check_repo_id(repo_id)
    token = token or get_token()
    if not token:
        raise UsageError("no Hugging Face token: set HF_TOKEN or run `hf auth login`, then push again")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    if revision and revision != "main":
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    operations = [CommitOperationAdd(path_in_repo=p.relative_to(folder).as_posix(), path_or_fileobj=str(p))
                  for p in _files(folder) if p.relative_to(folder).as_posix() != "README.md"]
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=model_card(folder, repo_id).encode()))
    info = api.create_commit(repo_id, operations=operations, revision=revision,
                             commit_message=commit_message or f"Upload {folder.name} with llmshrink")
    return getattr(info, "commit_url", None) or f"{api.endpoint}/{repo_id}"


def push_to_hub(model_or_folder, repo_id: str, **kwargs) -> str:
    """`push_folder` for a folder, or for a model loaded through `llmshrink.AutoModelForCausalLM`
    (the folder it was loaded from is uploaded as is, so its format is kept)."""
    folder = model_or_folder
    if not isinstance(model_or_folder, (str, os.PathLike)):
        folder = getattr(model_or_folder, "llmshrink_source", None)
        if folder is None:
            raise UsageError("this model was not loaded from an llmshrink folder; save it with save_pretrained "
                             "and push that folder")
    return push_folder(folder, repo_id, **kwargs)


def _cmd_push(args: argparse.Namespace) -> int:
    url = push_folder(args.dir, args.repo_id, private=args.private, revision=args.revision,
                      commit_message=args.message)
    print(f"pushed {args.dir} to {args.repo_id}: {url}")
    return 0


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add the `push` sub-command to llmshrink's command line."""
    p = subparsers.add_parser("push", help="upload a model folder with a generated model card to the Hub",
                              description="Upload a model folder (safetensors, configs, tokenizer, llmshrink "
                                          "records) and a generated README.md model card to a Hub repo.")
    p.add_argument("dir", help="the model folder, e.g. runs/quickstart/model")
    p.add_argument("--repo-id", required=True, help="ORG/NAME (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--revision", help="branch to commit to (default main)")
    p.add_argument("--message", help="commit message")
    p.set_defaults(func=_cmd_push)
