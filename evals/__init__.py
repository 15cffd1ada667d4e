"""llmshrink's evaluation harness: perplexity and downstream tasks, comparable with lm-eval.

Installed as `llmshrink.evals` (the repository keeps it in `evals/`). The data, perplexity,
loglikelihood and task modules sit low in the package (calibration and the training methods read
them) and are imported here; the harness sits on top of everything (it loads models of every
format), so its names resolve on first use (PEP 562 `__getattr__`) and importing
`llmshrink.evals.data` does not pull it in.
"""

import importlib

from .data import CORPORA, load_corpus, load_docs, load_text_file
from .loglikelihood import encode_pair, loglikelihoods
from .perplexity import PerplexityResult, perplexity, perplexity_of_ids
from .tasks import PPL_TASKS, TASKS

_HARNESS = ("DEFAULT_TASKS", "EvalSpec", "compare_models", "evaluate", "evaluate_model", "score_task")

__all__ = sorted(["CORPORA", "PPL_TASKS", "PerplexityResult", "TASKS", "encode_pair", "load_corpus", "load_docs",
                  "load_text_file", "loglikelihoods", "perplexity", "perplexity_of_ids", *_HARNESS])


def __getattr__(name: str):
    if name not in _HARNESS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.harness"), name)
    globals()[name] = value  # resolved once
    return value


def __dir__():
    return __all__
