"""llmshrink's evaluation harness: perplexity and downstream tasks, comparable with lm-eval.

Installed as `llmshrink.evals` (the repository keeps it in `evals/`). The data, perplexity and
loglikelihood modules sit low in the package (calibration and the training methods read them);
the harness sits on top of everything (it loads models of every format). So that importing
`llmshrink.evals.data` does not pull in the harness, the names below resolve on first use
(PEP 562 `__getattr__`), each from the module named beside it.
"""

import importlib

_EXPORTS = {
    "CORPORA": "data", "load_corpus": "data", "load_docs": "data", "load_text_file": "data",
    "DEFAULT_TASKS": "harness", "EvalSpec": "harness", "compare_models": "harness", "evaluate": "harness",
    "evaluate_model": "harness", "score_task": "harness",
    "encode_pair": "loglikelihood", "loglikelihoods": "loglikelihood",
    "PerplexityResult": "perplexity", "perplexity": "perplexity", "perplexity_of_ids": "perplexity",
    "PPL_TASKS": "tasks", "TASKS": "tasks",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value  # resolved once
    return value


def __dir__():
    return __all__
