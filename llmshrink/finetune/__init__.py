"""Full fine-tuning on domain text: the stand-in fine-tunes that delta compression is measured on."""

from .core import (DOMAIN_EVAL_PASSAGES, RECORD, FinetuneConfig, domain_eval_text, domain_perplexity, domain_texts,
                   finetune, finetuned_model, lr_factor)

__all__ = ["DOMAIN_EVAL_PASSAGES", "RECORD", "FinetuneConfig", "domain_texts", "domain_eval_text", "domain_perplexity",
           "finetune", "finetuned_model", "lr_factor"]
