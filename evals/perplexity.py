"""Perplexity with two exact, recorded protocols.

- `gptq`: tokenize the joined text once, cut it into non-overlapping windows of `seqlen`
  (the tail shorter than one window is dropped), score every token of a window but its first.
  ppl = exp(total NLL / tokens scored), tokens scored = windows * (seqlen - 1). (The GPTQ
  reference code multiplies the mean loss by seqlen instead of seqlen - 1; we divide by the
  tokens actually scored, and record them.)
- `sliding`: windows of `seqlen` starting every `stride` tokens, as in the transformers
  perplexity guide; each window scores only the tokens not scored before, with at least
  seqlen - stride tokens of context. With stride < seqlen every token but the very first is
  scored exactly once; with stride == seqlen a window's first token has no context and is not
  scored (as in the guide). ppl = exp(total NLL / tokens scored).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

__all__ = ["PerplexityResult", "check_windows", "perplexity", "perplexity_of_ids", "plan_windows", "window_nll"]

PROTOCOLS = ("gptq", "sliding")


@dataclass
class PerplexityResult:
    ppl: float
    nll: float  # summed over scored tokens, natural log
    tokens_scored: int
    windows: int
    protocol: str
    seqlen: int
    stride: int | None
    tokens_total: int

    def to_dict(self) -> dict:
        return asdict(self)


def plan_windows(n_tokens: int, seqlen: int, protocol: str, stride: int | None = None) -> list[tuple[int, int, int]]:
    """Windows as (begin, end, score_from): tokens [begin, end) go in, tokens at positions
    begin + score_from .. end - 1 are scored (score_from >= 1: the first input token has no context)."""
    if protocol == "gptq":
        return [(i * seqlen, (i + 1) * seqlen, 1) for i in range(n_tokens // seqlen)]
    if protocol != "sliding":
        raise ValueError(f"unknown protocol '{protocol}'; use one of {', '.join(PROTOCOLS)}")
    stride = stride or seqlen // 2
    windows, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + seqlen, n_tokens)
        windows.append((begin, end, max(1, prev_end - begin)))
        prev_end = end
        if end == n_tokens:
            break
    return windows


def window_nll(model, ids: torch.Tensor, score_from: int, chunk: int = 512) -> torch.Tensor:
    """Summed NLL per row of tokens ids[:, score_from:], each predicted from all tokens before it.

    Only the logits that predict scored tokens are computed (`logits_to_keep`, where the model
    takes it), so a sliding window scoring its last `stride` tokens pays for `stride` logits.

    Args:
        ids: [batch, seq] token ids.
        score_from: first position scored (>= 1).
        chunk: positions per log-softmax, so [chunk, vocab] is the largest fp32 temporary.
    Returns:
        [batch] float64 sums.
    """
    seq = ids.shape[1]
    keep = seq - score_from + 1  # logits at positions score_from - 1 .. seq - 1 (the last is unused)
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        logits = model(input_ids=ids, logits_to_keep=keep).logits  # [batch, keep, vocab]
    else:
        logits = model(input_ids=ids).logits[:, -keep:]
    total = torch.zeros(ids.shape[0], dtype=torch.float64, device=ids.device)
    for p in range(score_from, seq, chunk):
        q = min(p + chunk, seq)
        pred = logits[:, p - score_from:q - score_from].float()  # predicts ids[:, p:q]
        nll = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), ids[:, p:q].reshape(-1), reduction="none")
        total += nll.view(ids.shape[0], -1).sum(1).double()
    return total


def check_windows(n_tokens: int, seqlen: int, protocol: str, stride: int | None = None) -> list[tuple[int, int, int]]:
    """The windows for `n_tokens`, or ValueError if they would score nothing."""
    if protocol == "sliding":
        stride = stride or seqlen // 2
        if not 0 < stride <= seqlen:
            raise ValueError(f"stride={stride} must be between 1 and seqlen={seqlen}")
    windows = plan_windows(n_tokens, seqlen, protocol, stride)
    if not windows or all(b + s >= e for b, e, s in windows):
        raise ValueError(f"the text has {n_tokens} tokens, too few for one window of seqlen={seqlen}; "
                         "use a smaller seqlen or more text")
    return windows


def perplexity(model, tokenizer, text: str, **kwargs) -> PerplexityResult:
    """Perplexity of `model` on `text`, tokenized once as a whole; see `perplexity_of_ids`."""
    return perplexity_of_ids(model, torch.tensor(tokenizer(text).input_ids, dtype=torch.long), **kwargs)


@torch.inference_mode()
def perplexity_of_ids(
    model,
    ids: torch.Tensor,
    seqlen: int = 2048,
    protocol: str = "gptq",
    stride: int | None = None,
    batch_tokens: int = 4096,
    progress: str | None = None,
) -> PerplexityResult:
    """Perplexity of `model` on the token ids `ids` [n] under `protocol` (see the module docstring)."""
    stride = (stride or seqlen // 2) if protocol == "sliding" else None
    windows = check_windows(len(ids), seqlen, protocol, stride)
    device = next(model.parameters()).device
    vocab = model.get_output_embeddings().weight.shape[0]
    per_batch = max(1, min(batch_tokens // seqlen, (1 << 30) // (seqlen * vocab * 4)))
    # Windows of equal length and score_from batch together (all but the first and last, usually).
    groups: dict[tuple[int, int], list[tuple[int, int, int]]] = {}
    for w in windows:
        groups.setdefault((w[1] - w[0], w[2]), []).append(w)
    nll, scored = 0.0, 0
    bar = tqdm(total=len(windows), desc=progress, disable=progress is None, leave=False)
    for (length, score_from), group in groups.items():
        for i in range(0, len(group), per_batch):
            batch = group[i:i + per_batch]
            x = torch.stack([ids[b:e] for b, e, _ in batch]).to(device)  # [batch, length]
            nll += window_nll(model, x, score_from).sum().item()
            scored += len(batch) * (length - score_from)
            bar.update(len(batch))
    bar.close()
    return PerplexityResult(
        ppl=math.exp(nll / scored), nll=nll, tokens_scored=scored, windows=len(windows),
        protocol=protocol, seqlen=seqlen, stride=stride, tokens_total=len(ids),
    )
