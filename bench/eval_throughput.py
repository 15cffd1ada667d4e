"""Tokens/s of llmshrink's `gptq` perplexity against a plain one-window-at-a-time transformers loop.

Both run in this process on the same windows of the same corpus, alternating, best of `--rounds`;
the script prints both throughputs, their ratio, and both perplexities (which must agree).

    python bench/eval_throughput.py [--model smollm2-135m] [--passages 60] [--seqlen 2048] [--rounds 2]
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from llmshrink import load_model
from llmshrink.evals import load_corpus, perplexity_of_ids


def plain_loop(model, ids: torch.Tensor, seqlen: int) -> float:
    """What most scripts do: one window per forward, labels=input_ids, loss from the model."""
    nll, count = 0.0, 0
    for i in range(len(ids) // seqlen):
        x = ids[i * seqlen:(i + 1) * seqlen][None]
        with torch.no_grad():
            loss = model(x, labels=x).loss.item()
        nll, count = nll + loss * (seqlen - 1), count + seqlen - 1
    return math.exp(nll / count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--passages", type=int, default=60, help="first N wiki passages")
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--batch-tokens", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    model, tokenizer, _ = load_model(args.model)
    ids = torch.tensor(tokenizer(load_corpus("wiki", args.passages)).input_ids)
    windows = len(ids) // args.seqlen
    tokens = windows * args.seqlen
    best = {"plain": math.inf, "llmshrink": math.inf}
    ppl = {}
    for _ in range(args.rounds):
        start = time.perf_counter()
        ppl["plain"] = plain_loop(model, ids, args.seqlen)
        best["plain"] = min(best["plain"], time.perf_counter() - start)
        start = time.perf_counter()
        ppl["llmshrink"] = perplexity_of_ids(model, ids, seqlen=args.seqlen, protocol="gptq",
                                             batch_tokens=args.batch_tokens).ppl
        best["llmshrink"] = min(best["llmshrink"], time.perf_counter() - start)
    print(f"model={args.model} windows={windows} seqlen={args.seqlen} tokens={tokens} "
          f"batch_tokens={args.batch_tokens} threads={torch.get_num_threads()} torch={torch.__version__}")
    for name in ("plain", "llmshrink"):
        print(f"{name:10s} {tokens / best[name]:8.1f} tokens/s  ppl={ppl[name]:.4f}")
    print(f"ratio llmshrink/plain: {best['plain'] / best['llmshrink']:.2f}x")
    assert abs(ppl["plain"] - ppl["llmshrink"]) / ppl["plain"] < 1e-4, "perplexities disagree"


if __name__ == "__main__":
    main()
