"""Perplexity with three exact, recorded protocols.

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
- `rolling`: lm-evaluation-harness 0.4.13's rolling loglikelihood, one document at a time: the
  prefix token (BOS, else EOS) goes in front of the document, which is cut into disjoint windows
  of `seqlen` predicted tokens, each fed `seqlen` tokens (the last window takes extra context
  from before it), so every token is scored exactly once. Reports token perplexity and lm-eval's
  word_perplexity, byte_perplexity and bits_per_byte (words: `re.split(r"\s+", doc)`, bytes: UTF-8).

BOS (`bos`: "auto", "yes" or "no"; the text is tokenized without special tokens either way):
- gptq / sliding: with BOS, every window starts with the BOS token and then `seqlen - 1` text
  tokens (a window still feeds `seqlen` tokens); BOS is never scored, so every text token of a
  window is, the first included. Without BOS the windows are as above.
- rolling: the prefix token is always in front; with BOS the document's own tokens start with
  BOS (lm-eval's `add_bos_token`), which is scored, as lm-eval scores it.
- "auto" means BOS exactly when the tokenizer adds one by default (`tokenizer(text)` starts
  with `bos_token_id`, `add_special_tokens=False` does not), which is lm-eval's default too;
  "yes" needs a tokenizer with a BOS token, "no" never adds one.
"""

from __future__ import annotations

import inspect
import math
import re
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import UsageError

__all__ = ["BOS_CHOICES", "Encoded", "PROTOCOLS", "PerplexityResult", "check_windows", "encode", "perplexity",
           "perplexity_of_ids", "plan_windows", "resolve_bos", "rolling_perplexity_of_ids", "rolling_windows",
           "score", "tokenizer_adds_bos", "window_nll"]

PROTOCOLS = ("gptq", "sliding", "rolling")
BOS_CHOICES = ("auto", "yes", "no")


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
    bos: bool = False  # BOS in front of every window (gptq, sliding) / of every document (rolling)
    # rolling only: lm-eval's per-document counts and metrics
    docs: int | None = None
    words: int | None = None
    bytes: int | None = None
    word_perplexity: float | None = None
    byte_perplexity: float | None = None
    bits_per_byte: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether `tokenizer(text)` puts the BOS token in front by default."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    with_special = tokenizer("a").input_ids
    return bool(with_special) and with_special[0] == bos and tokenizer("a", add_special_tokens=False).input_ids[:1] != [bos]


def resolve_bos(tokenizer, bos: str) -> bool:
    """`bos` ("auto", "yes", "no") for this tokenizer: whether a BOS goes in front."""
    if bos not in BOS_CHOICES:
        raise UsageError(f"unknown --bos '{bos}'; use one of {', '.join(BOS_CHOICES)}")
    if bos == "yes" and getattr(tokenizer, "bos_token_id", None) is None:
        raise UsageError("--bos yes needs a tokenizer with a BOS token and this one has none; use --bos auto or no")
    return tokenizer_adds_bos(tokenizer) if bos == "auto" else bos == "yes"


@dataclass
class Encoded:
    """Text as the protocols read it: token ids without special tokens, and the BOS choice."""

    docs: list[torch.Tensor]  # [n] each; gptq/sliding: one, the joined text; rolling: one per document
    bos_id: int | None  # gptq/sliding: in front of every window; rolling: first token of every document
    prefix_id: int | None = None  # rolling: the token the first prediction is conditioned on
    words: int | None = None  # rolling: lm-eval's counts over the documents
    bytes: int | None = None


def encode(tokenizer, docs: str | list[str], protocol: str = "gptq", bos: str = "auto") -> Encoded:
    """Tokenize for `protocol`: gptq/sliding join the documents by blank lines (a str is taken as
    it is), rolling keeps each document apart."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol '{protocol}'; use one of {', '.join(PROTOCOLS)}")
    docs = [docs] if isinstance(docs, str) else list(docs)
    use_bos = resolve_bos(tokenizer, bos)
    bos_id = tokenizer.bos_token_id if use_bos else None

    def ids(text: str) -> torch.Tensor:
        return torch.tensor(tokenizer(text, add_special_tokens=False).input_ids, dtype=torch.long)

    if protocol != "rolling":
        return Encoded([ids("\n\n".join(docs))], bos_id)
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if prefix is None:
        raise UsageError("the rolling protocol needs a BOS or EOS token to put in front; this tokenizer has "
                         "neither: use --protocol gptq or sliding")
    encoded = [ids(d) for d in docs]
    if bos_id is not None:
        encoded = [torch.cat([torch.tensor([bos_id]), e]) for e in encoded]
    return Encoded(encoded, bos_id, prefix, words=sum(len(re.split(r"\s+", d)) for d in docs),
                   bytes=sum(len(d.encode("utf-8")) for d in docs))


def plan_windows(n_tokens: int, seqlen: int, protocol: str, stride: int | None = None,
                 bos: bool = False) -> list[tuple[int, int, int]]:
    """Windows as (begin, end, score_from): tokens [begin, end) go in, tokens at positions
    begin + score_from .. end - 1 are scored (score_from >= 1: the first input token has no context).

    With `bos` a BOS token goes in front of each window: windows hold seqlen - 1 text tokens and
    score_from may be 0 (the first text token is predicted from the BOS)."""
    span, first = seqlen - bos, 0 if bos else 1
    if protocol == "gptq":
        return [(i * span, (i + 1) * span, first) for i in range(n_tokens // span)]
    if protocol != "sliding":
        raise ValueError(f"unknown protocol '{protocol}' for plan_windows; use gptq or sliding")
    stride = stride or seqlen // 2
    windows, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + span, n_tokens)
        windows.append((begin, end, max(first, prev_end - begin)))
        prev_end = end
        if end == n_tokens:
            break
    return windows


def rolling_windows(n_tokens: int, seqlen: int) -> list[tuple[int, int, int]]:
    """lm-eval's rolling windows over a document of `n_tokens` tokens with the prefix token in
    front, as (begin, end, score_from) in the sequence [prefix] + document: tokens [begin, end - 1)
    go in (at most `seqlen`), tokens begin + score_from .. end - 1 are scored; every document token
    (positions 1 .. n_tokens) is scored exactly once."""
    first = min(seqlen, n_tokens)
    windows = [(0, first + 1, 1)] if n_tokens else []
    predicted = first
    while predicted < n_tokens:
        n_pred = min(n_tokens - predicted, seqlen)
        end = predicted + n_pred + 1  # the last predicted document token, + 1 for the prefix
        windows.append((end - seqlen - 1, end, seqlen + 1 - n_pred))
        predicted += n_pred
    return windows


def window_nll(model, ids: torch.Tensor, score_from: int, chunk: int = 512, feed_last: bool = True) -> torch.Tensor:
    """Summed NLL per row of tokens ids[:, score_from:], each predicted from all tokens before it.

    Only the logits that predict scored tokens are computed (`logits_to_keep`, where the model
    takes it), so a sliding window scoring its last `stride` tokens pays for `stride` logits.

    Args:
        ids: [batch, seq] token ids.
        score_from: first position scored (>= 1).
        chunk: positions per log-softmax, so [chunk, vocab] is the largest fp32 temporary.
        feed_last: also feed the last token (its logits predict nothing); False feeds seq - 1
            tokens, as lm-eval does, so a window of seqlen predictions fits seqlen positions.
    Returns:
        [batch] float64 sums.
    """
    seq = ids.shape[1]
    keep = seq - score_from + feed_last  # logits at positions score_from - 1 .. seq - 1 (the last is unused)
    inputs = ids if feed_last else ids[:, :-1]
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        logits = model(input_ids=inputs, logits_to_keep=keep).logits  # [batch, keep, vocab]
    else:
        logits = model(input_ids=inputs).logits[:, -keep:]
    total = torch.zeros(ids.shape[0], dtype=torch.float64, device=ids.device)
    for p in range(score_from, seq, chunk):
        q = min(p + chunk, seq)
        pred = logits[:, p - score_from:q - score_from].float()  # predicts ids[:, p:q]
        nll = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), ids[:, p:q].reshape(-1), reduction="none")
        total += nll.view(ids.shape[0], -1).sum(1).double()
    return total


def check_windows(n_tokens: int, seqlen: int, protocol: str, stride: int | None = None,
                  bos: bool = False) -> list[tuple[int, int, int]]:
    """The windows for `n_tokens`, or ValueError if they would score nothing (or skip tokens)."""
    if protocol == "rolling":
        if n_tokens == 0:
            raise ValueError("the text has no tokens; pass some text")
        return rolling_windows(n_tokens, seqlen)
    if protocol == "sliding":
        stride = stride or seqlen // 2
        if not 0 < stride <= seqlen - bos:
            raise ValueError(f"stride={stride} must be between 1 and seqlen={seqlen}"
                             + (" - 1 with a BOS in front of each window (or use --bos no)" if bos else ""))
    windows = plan_windows(n_tokens, seqlen, protocol, stride, bos)
    if not windows or all(b + s >= e for b, e, s in windows):
        raise ValueError(f"the text has {n_tokens} tokens, too few for one window of seqlen={seqlen}; "
                         "use a smaller seqlen or more text")
    return windows


def perplexity(model, tokenizer, text: str | list[str], protocol: str = "gptq", bos: str = "auto",
               **kwargs) -> PerplexityResult:
    """Perplexity of `model` on `text` (a string, or documents) under `protocol`; see `score`."""
    return score(model, encode(tokenizer, text, protocol, bos), protocol=protocol, **kwargs)


def score(model, encoded: Encoded, protocol: str = "gptq", **kwargs) -> PerplexityResult:
    """Perplexity of encoded text: `perplexity_of_ids` for gptq/sliding, `rolling_perplexity_of_ids`."""
    if protocol == "rolling":
        kwargs.pop("stride", None)
        return rolling_perplexity_of_ids(model, encoded.docs, encoded.prefix_id, bos=encoded.bos_id is not None,
                                         words=encoded.words, bytes_=encoded.bytes, **kwargs)
    (ids,) = encoded.docs
    return perplexity_of_ids(model, ids, protocol=protocol, bos_id=encoded.bos_id, **kwargs)


def _score_windows(model, windows: list[tuple[torch.Tensor, int]], seqlen: int, batch_tokens: int,
                   progress: str | None, feed_last: bool) -> tuple[float, int]:
    """Summed NLL and tokens scored of (window ids [length], score_from) pairs, batched."""
    device = next(model.parameters()).device
    head = model.get_output_embeddings()
    vocab = getattr(head, "out_features", None) or head.weight.shape[0]  # a quantized head has no .weight
    per_batch = max(1, min(batch_tokens // seqlen, (1 << 30) // (seqlen * vocab * 4)))
    # Windows of equal length and score_from batch together (all but the first and last, usually).
    groups: dict[tuple[int, int], list[torch.Tensor]] = {}
    for ids, score_from in windows:
        groups.setdefault((len(ids), score_from), []).append(ids)
    nll, scored = 0.0, 0
    bar = tqdm(total=len(windows), desc=progress, disable=progress is None, leave=False)
    for (length, score_from), group in groups.items():
        for i in range(0, len(group), per_batch):
            batch = group[i:i + per_batch]
            x = torch.stack(batch).to(device)  # [batch, length]
            nll += window_nll(model, x, score_from, feed_last=feed_last).sum().item()
            scored += len(batch) * (length - score_from)
            bar.update(len(batch))
    bar.close()
    return nll, scored


@torch.inference_mode()
def perplexity_of_ids(
    model,
    ids: torch.Tensor,
    seqlen: int = 2048,
    protocol: str = "gptq",
    stride: int | None = None,
    batch_tokens: int = 4096,
    progress: str | None = None,
    bos_id: int | None = None,
) -> PerplexityResult:
    """Perplexity of `model` on the token ids `ids` [n] under `protocol` "gptq" or "sliding" (see
    the module docstring); `bos_id` goes in front of every window when given."""
    stride = (stride or seqlen // 2) if protocol == "sliding" else None
    bos = bos_id is not None
    prefix = torch.tensor([bos_id] if bos else [], dtype=ids.dtype)
    windows = [(torch.cat([prefix, ids[b:e]]), s + bos)
               for b, e, s in check_windows(len(ids), seqlen, protocol, stride, bos)]
    nll, scored = _score_windows(model, windows, seqlen, batch_tokens, progress, feed_last=True)
    return PerplexityResult(
        ppl=math.exp(nll / scored), nll=nll, tokens_scored=scored, windows=len(windows),
        protocol=protocol, seqlen=seqlen, stride=stride, tokens_total=len(ids), bos=bos,
    )


@torch.inference_mode()
def rolling_perplexity_of_ids(
    model,
    docs: list[torch.Tensor],
    prefix_id: int,
    seqlen: int = 2048,
    batch_tokens: int = 4096,
    progress: str | None = None,
    bos: bool = False,
    words: int | None = None,
    bytes_: int | None = None,
) -> PerplexityResult:
    """lm-eval's rolling loglikelihood of every document in `docs` (token ids [n] each, BOS
    included where wanted) after `prefix_id`; word and byte metrics where `words`/`bytes_` are given.

    Returns:
        ppl = exp(NLL / tokens), word_perplexity = exp(NLL / words), byte_perplexity =
        exp(NLL / bytes), bits_per_byte = NLL / bytes / ln 2 (NLL summed over all documents).
    """
    windows = []
    for ids in docs:
        seq = torch.cat([torch.tensor([prefix_id], dtype=ids.dtype), ids])
        windows += [(seq[b:e], s) for b, e, s in check_windows(len(ids), seqlen, "rolling")]
    nll, scored = _score_windows(model, windows, seqlen, batch_tokens, progress, feed_last=False)
    total = sum(len(d) for d in docs)
    assert scored == total, "rolling windows score every token once"
    return PerplexityResult(
        ppl=math.exp(nll / scored), nll=nll, tokens_scored=scored, windows=len(windows), protocol="rolling",
        seqlen=seqlen, stride=None, tokens_total=total, bos=bos, docs=len(docs), words=words, bytes=bytes_,
        word_perplexity=math.exp(nll / words) if words else None,
        byte_perplexity=math.exp(nll / bytes_) if bytes_ else None,
        bits_per_byte=nll / bytes_ / math.log(2) if bytes_ else None,
    )
