"""`llmshrink lm-eval ARGS`: lm-evaluation-harness's own command line, with llmshrink's formats loadable.

Every argument goes to lm-eval unchanged (its errors are its own); only `--model hf`'s
`pretrained=` is made loadable first, by what llmshrink knows of the folder:
- GPTQ checkpoints and delta folders load through transformers once llmshrink is imported (its
  GPTQ quantizer and delta model type are registered), so gptqmodel is not needed; a delta
  folder's tokenizer is its base's (`tokenizer=` is set unless given);
- a packed folder is decoded once into the llmshrink cache and that folder is given instead;
- an adapter folder (`llmshrink heal`) is loaded with its base by llmshrink (a GPTQ base too,
  which peft alone cannot wrap) and handed to lm-eval as a loaded model, with its tokenizer;
- packaged names (`smollm2-135m`) become their folder.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from ..auto import AutoModelForCausalLM
from ..errors import UsageError
from ..formats import open_folder
from ..models import resolve_model

__all__ = ["main", "loadable_model_args"]

HF_MODELS = (None, "hf", "hf-auto", "huggingface")


def loadable_model_args(model_args: dict) -> dict:
    """`model_args` of lm-eval's hf model with `pretrained` rewritten as described above."""
    pretrained = model_args.get("pretrained")
    if not isinstance(pretrained, str):
        return model_args
    resolved = resolve_model(pretrained)
    if not Path(resolved).is_dir():
        return model_args  # a Hub id: lm-eval loads it as usual
    folder, fmt = open_folder(resolved)  # a packed folder: its decoded copy
    args = {**model_args, "pretrained": str(folder)}
    if not fmt.transformers_loads:  # an adapter: loaded here, handed to lm-eval as a model
        dtype = args.pop("dtype", "float32")
        args["pretrained"] = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype).eval()
    tokenizer = fmt.tokenizer_folder(folder)
    if tokenizer != str(folder) or not fmt.transformers_loads:  # a delta's is its base's
        args.setdefault("tokenizer", tokenizer)
    return args


def main(argv: list[str]) -> int:
    """Run lm-eval's command line on `argv` (as `lm_eval` would take them)."""
    if importlib.util.find_spec("lm_eval") is None:
        raise UsageError("llmshrink lm-eval runs lm-evaluation-harness, which is not installed; "
                         "install it with: pip install lm-eval==0.4.13")
    # lm-eval is optional (a test and bench dependency): imported only when this command runs.
    from lm_eval._cli import HarnessCLI
    from lm_eval.utils import setup_logging

    setup_logging()
    parser = HarnessCLI()
    saved, sys.argv = sys.argv, ["lm-eval", *argv]  # HarnessCLI reads sys.argv (and accepts the legacy form)
    try:
        args = parser.parse_args()
    finally:
        sys.argv = saved
    if isinstance(getattr(args, "model_args", None), dict) and getattr(args, "model", None) in HF_MODELS:
        args.model_args = loadable_model_args(args.model_args)
    parser.execute(args)
    return 0
