"""Gradual against one-shot Wanda pruning at the same final sparsity and the same total healing
steps, on the packaged model, side by side in one run.

Rows: one-shot Wanda without healing; one-shot Wanda then --heal-steps of healing (`weight_prune`
with rounds=1); --rounds prune -> heal rounds on the cubic schedule sharing the same steps (gradual
pruning), and the same with lottery-ticket rewinding. Each round's healing is `llmshrink heal` with
KD from the unpruned model: LoRA (lr 1e-3, merged, the pruned weights zeroed again; the rows
without a suffix) or sparse full fine-tuning (`-full` rows: lr 1e-4, every surviving weight
trained, the pruned ones held at zero). Scored on the held-out wiki windows (the corpus's first
passages; calibration and healing text come from the other half).

    python bench/gradual.py --sparsity 0.6 --rounds 3 --heal-steps 36 --json bench/gradual.json

The goal (issue 20): iterative Wanda to 60% unstructured sparsity beats one-shot Wanda + the same
healing steps.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from safetensors import safe_open

import llmshrink
from llmshrink import WeightPruneConfig, load_tokenizer, resolve_model
from llmshrink.calibration import Calibration

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quantize import held_out_ids, ppl_of  # noqa: E402


def sparsity(folder: Path) -> float:
    """Share of zeros over the decoder linears' weights, read from the saved tensors."""
    zeros = total = 0
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        for key in f.keys():
            if ".layers." in key and key.endswith("proj.weight"):
                t = f.get_tensor(key)
                zeros, total = zeros + int((t == 0).sum()), total + t.numel()
    return zeros / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--sparsity", type=float, default=0.6)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--heal-steps", type=int, default=36)
    parser.add_argument("--nsamples", type=int, default=64, help="Wanda's calibration windows of 512 tokens")
    parser.add_argument("--eval-windows", type=int, default=40)
    parser.add_argument("--rows", default="oneshot,oneshot-healed,gradual,gradual-rewind")
    parser.add_argument("--work", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    source = resolve_model(args.model)
    ids = held_out_ids(load_tokenizer(args.model), args.eval_windows, 512)
    work = Path(args.work or tempfile.mkdtemp(prefix="llmshrink-bench-gradual-"))
    calibration = Calibration(source="wiki", nsamples=args.nsamples, seqlen=512)
    s, h, r = args.sparsity, args.heal_steps, args.rounds
    lora = dict(heal_lr=1e-3)  # the LoRA rows' learning rate, as recorded before heal_lr had per-method defaults
    full = dict(heal_method="full")
    configs = {
        "oneshot": WeightPruneConfig(sparsity=s, **lora),
        "oneshot-healed": WeightPruneConfig(sparsity=s, heal_steps=h, **lora),
        "gradual": WeightPruneConfig(sparsity=s, rounds=r, heal_steps=h, **lora),
        "gradual-rewind": WeightPruneConfig(sparsity=s, rounds=r, heal_steps=h, rewind=True, **lora),
        "gradual-linear": WeightPruneConfig(sparsity=s, rounds=r, heal_steps=h, schedule="linear", **lora),
        "oneshot-healed-full": WeightPruneConfig(sparsity=s, heal_steps=h, **full),
        "gradual-full": WeightPruneConfig(sparsity=s, rounds=r, heal_steps=h, **full),
        "gradual-linear-full": WeightPruneConfig(sparsity=s, rounds=r, heal_steps=h, schedule="linear", **full),
    }
    names = args.rows.split(",")
    result = {"model": args.model, "original_ppl": ppl_of(source, ids, 512), "rows": []}
    if args.json and Path(args.json).exists():  # rerunning some rows keeps the others (same settings only)
        kept = json.loads(Path(args.json).read_text())
        same = lambda row: WeightPruneConfig.from_dict(row["config"]) == configs.get(row["row"])  # noqa: E731
        result["rows"] = [row for row in kept.get("rows", []) if row["row"] not in names and same(row)]
    print(f"original ppl {result['original_ppl']:.3f}", flush=True)
    for name in names:
        config = configs[name]
        started = time.perf_counter()
        out = llmshrink.compress(source, config, work / name, calibration=calibration, overwrite=True, progress=False)
        rounds = json.loads((out / "config.json").read_text())["llmshrink_prune"].get("rounds", [])
        row = {"row": name, "config": config.to_dict(), "seconds": round(time.perf_counter() - started, 1),
               "heal_seconds": round(sum(x.get("train_seconds", 0) for x in rounds), 1),
               "round_sparsity": [x["sparsity"] for x in rounds], "sparsity": sparsity(out),
               "ppl": ppl_of(str(out), ids, 512)}
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1) + "\n")

    print(f"\n| run | rounds (sparsity after each) | heal | heal steps | heal s | sparsity | wiki ppl |")
    print("|---|---|---|---|---|---|---|")
    print(f"| original | | | | | 0 | {result['original_ppl']:.3f} |")
    for row in result["rows"]:
        c = row["config"]
        path = " -> ".join(f"{x:.3f}" for x in row["round_sparsity"])
        cfg = WeightPruneConfig.from_dict(c)
        heal = f"{cfg.heal_method} lr {cfg.learning_rate():g}" if cfg.heal_steps else ""
        print(f"| {row['row']} | {c['rounds']} ({path}) | {heal} | {c['heal_steps']} | {row['heal_seconds']:.0f} | "
              f"{row['sparsity']:.4f} | {row['ppl']:.3f} |")
    by = {row["row"]: row for row in result["rows"]}
    for name in [n for n in by if n.startswith("gradual")]:
        baseline = "oneshot-healed-full" if name.endswith("-full") else "oneshot-healed"
        if baseline in by:
            a, b = by[name]["ppl"], by[baseline]["ppl"]
            print(f"{name} {a:.3f} vs {baseline} (one-shot + the same healing) {b:.3f}: "
                  f"{'beats' if a < b else 'does NOT beat'} it ({a / b - 1:+.1%})")


if __name__ == "__main__":
    main()
