"""Layer and weight pruning of the default model, side by side with the original, in one run.

Layer pruning: 25% of the decoder layers (7 of 30) removed by block influence (ShortGPT), by
angular distance (Gromov et al.) and from the end (the naive baseline). Weight pruning: 50%
unstructured and 2:4, Wanda against magnitude. Every model is scored on held-out `wiki` windows
(the corpus's first passages; calibration uses the other half) and, unless --limit 0, on
piqa / hellaswag / arc_easy (first --limit items).

    python bench/prune.py [--limit 500] [--eval-windows 40] [--nsamples 64]

Healing rows (LoRA + KD) arrive with the healing half of the pruning issue.
"""

from __future__ import annotations

import argparse
import time

import torch

from llmshrink import LayerPruneConfig, WeightPruneConfig, load_model, prune
from llmshrink.evals import load_corpus, perplexity_of_ids, score_task

TASKS = ("piqa", "hellaswag", "arc_easy")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=500, help="items per task (0 skips the tasks)")
    ap.add_argument("--eval-windows", type=int, default=40, help="wiki windows of 512 tokens")
    ap.add_argument("--nsamples", type=int, default=64, help="calibration windows of 512 tokens")
    ap.add_argument("--layers", type=int, default=7)
    args = ap.parse_args()

    model, tokenizer, _ = load_model("smollm2-135m")
    ids = torch.tensor(tokenizer(load_corpus("wiki", limit=400)).input_ids[: args.eval_windows * 512])
    runs = {"original": None}
    runs.update({f"-{args.layers} layers, {c}": LayerPruneConfig(layers=args.layers, criterion=c)
                 for c in ("block_influence", "angular", "last")})
    runs.update({f"50% {p}, {s}": WeightPruneConfig(sparsity=0.5, score=s, pattern=p)
                 for p in ("unstructured", "2:4") for s in ("wanda", "magnitude")})
    rows = []
    for name, config in runs.items():
        model, tokenizer, _ = load_model("smollm2-135m")
        start = time.perf_counter()
        if config is not None:
            prune(model, config, tokenizer=tokenizer, nsamples=args.nsamples, seqlen=512, progress=False)
        seconds = time.perf_counter() - start
        row = {"model": name, "ppl": perplexity_of_ids(model, ids, seqlen=512).ppl, "seconds": seconds,
               "removed": model.config.llmshrink_prune.get("removed") if config is not None else None}
        for task in TASKS if args.limit else ():
            row[task] = score_task(model, tokenizer, task, limit=args.limit)["acc"]
        rows.append(row)
        print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    tasks = TASKS if args.limit else ()
    print(f"\n| model | layers removed | wiki ppl ({len(ids)} tokens) | " + " | ".join(f"{t} acc" for t in tasks)
          + " | prune s |")
    print("|---|---|---|" + "---|" * len(tasks) + "---|")
    for r in rows:
        print(f"| {r['model']} | {r['removed'] or ''} | {r['ppl']:.3f} | "
              + " | ".join(f"{r[t]:.3f}" for t in tasks) + f" | {r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
