"""Layer and weight pruning of the default model, side by side with the original, in one run.

Layer pruning: 25% of the decoder layers (7 of 30) removed by block influence (ShortGPT), by
angular distance (Gromov et al.) and from the end (the naive baseline); each pruned model is then
healed with LoRA + KD from the original (`llmshrink.heal`, --heal-steps steps, a few minutes on
the CPU; the training seconds are printed). Weight pruning: 50% unstructured and 2:4, Wanda
against magnitude. Every model is scored on held-out `wiki` windows (the corpus's first passages;
calibration and healing text come from the other half) and, unless --limit 0, on piqa /
hellaswag / arc_easy (first --limit items).

    python bench/prune.py [--limit 500] [--eval-windows 40] [--nsamples 64] [--heal-steps 36]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from llmshrink import LayerPruneConfig, WeightPruneConfig, load_model, prune
from llmshrink.evals import load_corpus, perplexity_of_ids, score_task
from llmshrink.evals.data import corpus_documents
from llmshrink.heal import RECORD, HealConfig, heal
from llmshrink.prune import save_pruned

TASKS = ("piqa", "hellaswag", "arc_easy")


def healed(model, tokenizer, teacher: str, config: HealConfig, work: Path):
    """(merged healed model, training seconds): save the pruned model, heal it with LoRA + KD, merge."""
    save_pruned(model, tokenizer, work / "pruned", overwrite=True)
    out = heal(work / "pruned", config, work / "healed", teacher=teacher, overwrite=True, progress=False)
    from transformers import AutoModelForCausalLM

    seconds = json.loads((out / RECORD).read_text())["train_seconds"]
    return AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval(), seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=500, help="items per task (0 skips the tasks)")
    ap.add_argument("--eval-windows", type=int, default=40, help="wiki windows of 512 tokens")
    ap.add_argument("--nsamples", type=int, default=64, help="calibration windows of 512 tokens")
    ap.add_argument("--layers", type=int, default=7)
    ap.add_argument("--heal-steps", type=int, default=36, help="LoRA + KD steps of 4 x 256 tokens (0: no healing)")
    args = ap.parse_args()

    model, tokenizer, resolved = load_model("smollm2-135m")
    eval_docs = 400
    assert eval_docs <= len(corpus_documents("wiki")) // 2, "eval passages would overlap the calibration half"
    ids = torch.tensor(tokenizer(load_corpus("wiki", limit=eval_docs)).input_ids[: args.eval_windows * 512])
    heal_config = HealConfig(loss="ce+kd", steps=args.heal_steps, lr=1e-3, warmup=min(2, args.heal_steps), seqlen=256, batch_size=4,
                             nsamples=4 * max(args.heal_steps, 1), merge=True)
    runs = {"original": None}
    for c in ("block_influence", "angular", "last"):
        runs[f"-{args.layers} layers, {c}"] = LayerPruneConfig(layers=args.layers, criterion=c)
        if args.heal_steps:
            runs[f"-{args.layers} layers, {c}, healed"] = LayerPruneConfig(layers=args.layers, criterion=c)
    runs.update({f"50% {p}, {s}": WeightPruneConfig(sparsity=0.5, score=s, pattern=p)
                 for p in ("unstructured", "2:4") for s in ("wanda", "magnitude")})
    rows = []
    work = Path(tempfile.mkdtemp(prefix="llmshrink-bench-prune-"))
    for name, config in runs.items():
        model, tokenizer, _ = load_model("smollm2-135m")
        start = time.perf_counter()
        if config is not None:
            prune(model, config, tokenizer=tokenizer, nsamples=args.nsamples, seqlen=512, progress=False)
        seconds = time.perf_counter() - start
        removed = model.config.llmshrink_prune.get("removed") if config is not None else None
        heal_seconds = None
        if name.endswith("healed"):
            model, heal_seconds = healed(model, tokenizer, resolved, heal_config, work)
        row = {"model": name, "ppl": perplexity_of_ids(model, ids, seqlen=512).ppl, "seconds": seconds,
               "heal_seconds": heal_seconds, "removed": removed}
        for task in TASKS if args.limit else ():
            row[task] = score_task(model, tokenizer, task, limit=args.limit)["acc"]
        rows.append(row)
        print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    tasks = TASKS if args.limit else ()
    print(f"\n| model | layers removed | wiki ppl ({len(ids)} tokens) | " + " | ".join(f"{t} acc" for t in tasks)
          + " | prune s | heal s |")
    print("|---|---|---|" + "---|" * len(tasks) + "---|---|")
    for r in rows:
        heal_s = "" if r["heal_seconds"] is None else f"{r['heal_seconds']:.0f}"
        print(f"| {r['model']} | {r['removed'] or ''} | {r['ppl']:.3f} | "
              + " | ".join(f"{r[t]:.3f}" for t in tasks) + f" | {r['seconds']:.0f} | {heal_s} |")
    summarize({r["model"]: r for r in rows}, args.layers)


def summarize(rows: dict[str, dict], layers: int) -> None:
    """The issue's goals, from the rows: healing recovery, criteria against `last`, Wanda against magnitude."""
    original = rows["original"]["ppl"]
    last = rows[f"-{layers} layers, last"]["ppl"]
    print()
    for c in ("block_influence", "angular", "last"):
        pruned = rows[f"-{layers} layers, {c}"]["ppl"]
        verdict = "no worse than" if pruned <= last else "WORSE than"
        print(f"{c}: ppl {pruned:.3f}, {verdict} removing the last {layers} layers ({last:.3f})")
        if f"-{layers} layers, {c}, healed" in rows:
            heal_row = rows[f"-{layers} layers, {c}, healed"]
            recovered = (pruned - heal_row["ppl"]) / (pruned - original)
            print(f"  healed in {heal_row['heal_seconds']:.0f} s: ppl {pruned:.3f} -> {heal_row['ppl']:.3f}, "
                  f"{100 * recovered:.0f}% of the {pruned - original:.3f} lost recovered (goal >= 50%)")
    for pattern in ("unstructured", "2:4"):
        wanda, magnitude = rows[f"50% {pattern}, wanda"]["ppl"], rows[f"50% {pattern}, magnitude"]["ppl"]
        print(f"50% {pattern}: wanda {wanda:.3f} vs magnitude {magnitude:.3f}: "
              f"{'wanda better' if wanda < magnitude else 'MAGNITUDE better'}")


if __name__ == "__main__":
    main()
