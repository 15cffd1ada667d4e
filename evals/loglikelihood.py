"""Batched log-likelihood of continuations given contexts, as lm-evaluation-harness computes it.

Tokenisation follows lm-eval's causal `_encode_pair`: trailing spaces of the context move to the
continuation, the whole string is encoded once and split at the context's token count. Requests
are sorted longest first and batched under a token budget, left-padded with an attention mask and
explicit position ids, and only the continuation positions' logits are kept (`logits_to_keep`),
so a large vocabulary never materialises [batch, seq, vocab] logits.
"""

from __future__ import annotations

import inspect
from typing import Sequence

import torch
from tqdm.auto import tqdm

__all__ = ["encode_pair", "loglikelihoods", "model_max_length"]


def model_max_length(config, default: int = 2048) -> int:
    """The context length lm-eval would use: the first of n_positions, max_position_embeddings, n_ctx."""
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return default


def _encode(tokenizer, text: str) -> list[int]:
    # lm-eval: the tokenizer's default special tokens, unless the text already starts with BOS.
    bos = tokenizer.bos_token
    if bos and text.startswith(bos):
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(text)


def _prefix_token_id(tokenizer) -> int:
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation), split exactly as lm-eval splits them."""
    if not context:
        return [_prefix_token_id(tokenizer)], _encode(tokenizer, continuation)
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = _encode(tokenizer, context + continuation)
    ctx = _encode(tokenizer, context)
    return ctx, whole[len(ctx):]


def _accepts(model, name: str) -> bool:
    return name in inspect.signature(model.forward).parameters


@torch.inference_mode()
def loglikelihoods(
    model,
    tokenizer,
    requests: Sequence[tuple[str, str]],
    batch_tokens: int = 8192,
    max_batch: int = 64,
    max_length: int | None = None,
    progress: str | None = None,
) -> list[tuple[float, bool]]:
    """Score each (context, continuation).

    Args:
        model: a causal LM in eval mode.
        tokenizer: its tokenizer.
        requests: (context, continuation) strings.
        batch_tokens: padded tokens per forward pass (bounds memory).
        max_batch: most sequences per forward pass.
        max_length: context window; longer inputs keep their last tokens, as lm-eval does.
        progress: description for a progress bar, or None for none.
    Returns:
        (summed log-probability of the continuation, whether greedy decoding reproduces it)
        for each request, in the order given.
    """
    max_length = max_length or model_max_length(model.config)
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else _prefix_token_id(tokenizer)
    # Each row: the model input (all tokens but the last, left-truncated) and the continuation.
    rows = []
    for ctx, cont in (encode_pair(tokenizer, c, x) for c, x in requests):
        if not cont:
            raise ValueError("a continuation encoded to no tokens; every request must score something")
        rows.append(((ctx + cont)[-(max_length + 1):][:-1], cont[-max_length:]))
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    keep_arg = _accepts(model, "logits_to_keep")
    batched = _accepts(model, "position_ids")  # left padding needs explicit positions
    results: list[tuple[float, bool] | None] = [None] * len(rows)
    bar = tqdm(total=len(rows), desc=progress, disable=progress is None, leave=False)
    start = 0
    while start < len(order):
        width = len(rows[order[start]][0])  # longest in this batch, since sorted
        size = max(1, min(max_batch, batch_tokens // max(width, 1))) if batched else 1
        idx = order[start:start + size]
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            inp = rows[i][0]
            ids[r, width - len(inp):] = torch.tensor(inp)
            mask[r, width - len(inp):] = 1
        keep = max(len(rows[i][1]) for i in idx)
        kwargs = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
        if batched:
            kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0).to(device)
        if keep_arg:
            kwargs["logits_to_keep"] = keep
        logits = model(**kwargs).logits[:, -keep:]  # [batch, keep, vocab]
        for r, i in enumerate(idx):
            cont = rows[i][1]
            logp = logits[r, keep - len(cont):].float().log_softmax(-1)  # [len(cont), vocab]
            target = torch.tensor(cont, device=logp.device)
            ll = logp.gather(-1, target[:, None]).sum().item()
            greedy = bool((logp.argmax(-1) == target).all())
            results[i] = (ll, greedy)
        del logits
        bar.update(len(idx))
        start += len(idx)
    bar.close()
    return results  # type: ignore[return-value]
