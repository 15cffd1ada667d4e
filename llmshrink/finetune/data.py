"""The domain data of the fine-tune: LAMBADA passages in file order, the first 500 held out.

Domain perplexity is the `gptq` protocol of `llmshrink.evals.perplexity` on the eval passages
joined by blank lines.
"""

from __future__ import annotations

import torch

from ..errors import UsageError
from ..evals.data import corpus_documents
from ..evals.perplexity import perplexity_of_ids

__all__ = ["DOMAIN_CORPUS", "DOMAIN_EVAL_PASSAGES", "domain_eval_text", "domain_perplexity", "domain_texts"]

DOMAIN_CORPUS = "lambada"
DOMAIN_EVAL_PASSAGES = 500  # the first 500 LAMBADA passages (file order) are held out for evaluation


def domain_texts() -> tuple[list[str], list[str]]:
    """The LAMBADA passages split for fine-tuning.

    Returns:
        (train_docs, eval_docs): eval is the first 500 passages in file order, train the other 4653.
    """
    docs = corpus_documents(DOMAIN_CORPUS)
    return docs[DOMAIN_EVAL_PASSAGES:], docs[:DOMAIN_EVAL_PASSAGES]


def domain_eval_text() -> str:
    """The 500 held-out passages joined by blank lines (about 40k SmolLM2 tokens)."""
    return "\n\n".join(domain_texts()[1])


def domain_perplexity(model, tokenizer, seqlen: int = 512, limit_windows: int | None = None) -> float:
    """Perplexity on the domain eval text, `gptq` protocol (non-overlapping windows of `seqlen`).

    Args:
        model: a causal LM; it is put in eval mode and left there.
        tokenizer: its tokenizer.
        seqlen: tokens per window.
        limit_windows: score only the first this many windows (all, about 40k // seqlen, if None).
    Returns:
        exp(mean NLL) over the scored tokens.
    """
    ids = torch.tensor(tokenizer(domain_eval_text()).input_ids, dtype=torch.long)
    if limit_windows is not None:
        if limit_windows < 1:
            raise UsageError(f"limit_windows={limit_windows} scores nothing; use a positive number or None for all")
        ids = ids[:limit_windows * seqlen]  # [limit_windows * seqlen]
    model.eval()
    return perplexity_of_ids(model, ids, seqlen=seqlen, protocol="gptq").ppl
