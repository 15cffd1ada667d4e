"""Full fine-tuning on domain text: the stand-in fine-tunes that delta compression is measured on.

config.py (FinetuneConfig) -> data.py (LAMBADA split, domain perplexity) -> run.py (`finetune`
through `llmshrink.train.train_loop`, `finetuned_model`'s cache).
"""

from ..train.schedule import lr_factor
from .config import RECORD, FinetuneConfig
from .data import DOMAIN_EVAL_PASSAGES, domain_eval_text, domain_perplexity, domain_texts
from .run import finetune, finetuned_model

__all__ = ["DOMAIN_EVAL_PASSAGES", "RECORD", "FinetuneConfig", "domain_texts", "domain_eval_text", "domain_perplexity",
           "finetune", "finetuned_model", "lr_factor"]
