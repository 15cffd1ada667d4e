"""llmshrink's evaluation harness: perplexity and downstream tasks, comparable with lm-eval.

Installed as `llmshrink.evals` (the repository keeps it in `evals/`).
"""

from .data import CORPORA, load_corpus, load_docs, load_text_file
from .harness import DEFAULT_TASKS, EvalSpec, compare_models, evaluate, evaluate_model, score_task
from .loglikelihood import encode_pair, loglikelihoods
from .perplexity import PerplexityResult, perplexity, perplexity_of_ids
from .tasks import PPL_TASKS, TASKS

__all__ = [
    "CORPORA", "DEFAULT_TASKS", "EvalSpec", "PPL_TASKS", "PerplexityResult", "TASKS",
    "compare_models", "encode_pair", "evaluate", "evaluate_model", "load_corpus", "load_docs",
    "load_text_file", "loglikelihoods", "perplexity", "perplexity_of_ids", "score_task",
]
