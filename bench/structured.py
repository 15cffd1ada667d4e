"""Width pruning, low-rank factorization and layer pruning at equal bytes on disk, before and after
the same healing, on the packaged model, side by side in one run.

Width pruning keeps --ratio of the decoder's parameters (MLP channels and key/value groups by
measured output energy); layer pruning (block influence, its best measured removal) removes the
number of decoder layers whose bytes come closest to what width pruning removed; factorization
keeps --ratio of the decoder linears' parameters (a cut of --scores, a map from `factorize
--save-scores`, or a dedicated run without one). Each is then healed with LoRA + KD from the
original for --heal-minutes at most (`llmshrink heal`, --heal-steps steps of 4 x 256 tokens, the
cosine schedule over the steps; the training seconds are printed), or with --heal-method full with
every weight trained. Every model is scored on the
same held-out wiki windows (the corpus's first passages; calibration and healing text come from
the other half).

    python bench/structured.py --ratio 0.8 --heal-minutes 5 --scores SCORE_MAP --json bench/structured.json

The goals (issue 20): width pruning to 80% + <= 5 minutes of healing recovers >= 60% of the
perplexity lost; at equal bytes the best of factorize / width_prune beats layer pruning, before and
after the same healing.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoConfig

import llmshrink
from llmshrink import load_tokenizer, resolve_model
from llmshrink.calibration import Calibration
from llmshrink.factorize import FactorizeConfig
from llmshrink.formats import weight_bytes
from llmshrink.heal import RECORD, HealConfig
from llmshrink.prune import LayerPruneConfig
from llmshrink.width_prune import WidthPruneConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quantize import held_out_ids, ppl_of  # noqa: E402


def layer_bytes(source: str) -> int:
    """Bytes of one decoder layer's weights as stored (fp32 here): its parameters from the config."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source))
    layer = model.model.layers[0]
    return sum(p.numel() for p in layer.parameters()) * 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratio", type=float, default=0.8)
    parser.add_argument("--nsamples", type=int, default=128, help="calibration windows of 512 tokens")
    parser.add_argument("--eval-windows", type=int, default=40)
    parser.add_argument("--scores", default=None, help="a factorize score map of --model (default: a dedicated run)")
    parser.add_argument("--heal-steps", type=int, default=40)
    parser.add_argument("--heal-minutes", type=float, default=5.0)
    parser.add_argument("--heal-method", default="lora", choices=("lora", "full"),
                        help="LoRA (merged) or every weight trained (`heal --method full`)")
    parser.add_argument("--heal-lr", type=float, default=None, help="default: 1e-3 for lora, 1e-4 for full")
    parser.add_argument("--rows", default="width,layers,factorize")
    parser.add_argument("--work", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    source = resolve_model(args.model)
    tokenizer = load_tokenizer(args.model)
    work = Path(args.work or tempfile.mkdtemp(prefix="llmshrink-bench-structured-"))
    work.mkdir(parents=True, exist_ok=True)
    calibration = Calibration(source="wiki", nsamples=args.nsamples, seqlen=512)
    ids = held_out_ids(tokenizer, args.eval_windows, 512)
    lr = args.heal_lr or (1e-3 if args.heal_method == "lora" else 1e-4)
    heal_config = HealConfig(adapter=args.heal_method, loss="ce+kd", steps=args.heal_steps, lr=lr, warmup=2,
                             seqlen=256, batch_size=4, nsamples=4 * args.heal_steps, merge=args.heal_method == "lora",
                             max_minutes=args.heal_minutes)
    original = {"row": "original", "bytes": weight_bytes(source), "ppl": ppl_of(source, ids, 512)}
    result = {"model": args.model, "ratio": args.ratio, "eval_windows": args.eval_windows,
              "heal": heal_config.to_dict(), "rows": [original]}
    print(f"original: ppl {original['ppl']:.3f}, {original['bytes'] / 1e6:.1f} MB", flush=True)

    def save() -> None:
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1) + "\n")

    def add(name: str, config, calibrated: bool = True) -> None:
        started = time.perf_counter()
        out = llmshrink.compress(source, config, work / name, calibration=calibration if calibrated else None,
                                 overwrite=True, progress=False)
        seconds = time.perf_counter() - started
        row = {"row": name, "config": config.to_dict(), "bytes": weight_bytes(out), "seconds": round(seconds, 1),
               "ppl": ppl_of(str(out), ids, 512)}
        print(f"{name}: ppl {row['ppl']:.3f}, {row['bytes'] / 1e6:.1f} MB ({row['bytes'] / original['bytes']:.3f}x), "
              f"{seconds:.0f} s", flush=True)
        healed = llmshrink.compress(out, heal_config, work / f"{name}-healed", overwrite=True, progress=False,
                                    original=source)
        record = json.loads((healed / RECORD).read_text())
        row.update(healed_ppl=ppl_of(str(healed), ids, 512), heal_seconds=record["train_seconds"],
                   heal_steps=record["steps_done"], healed_bytes=weight_bytes(healed))
        lost = row["ppl"] - original["ppl"]
        row["recovered"] = (row["ppl"] - row["healed_ppl"]) / lost if lost > 0 else None
        print(f"{name}, healed: ppl {row['healed_ppl']:.3f} after {row['heal_steps']} steps in "
              f"{row['heal_seconds']:.0f} s (recovered {row['recovered']:.1%} of the loss)", flush=True)
        result["rows"].append(row)
        save()

    wanted = args.rows.split(",")
    width_bytes = None
    if "width" in wanted:
        add("width_prune", WidthPruneConfig(ratio=args.ratio))
        width_bytes = result["rows"][-1]["bytes"]
    if "layers" in wanted:
        per_layer = layer_bytes(source)
        target = width_bytes if width_bytes is not None else original["bytes"] - (1 - args.ratio) * per_layer * \
            AutoConfig.from_pretrained(source).num_hidden_layers
        layers = max(1, round((original["bytes"] - target) / per_layer))
        add(f"layer_prune-{layers}", LayerPruneConfig(layers=layers, criterion="block_influence"))
    if "factorize" in wanted:
        config = FactorizeConfig(ratio=args.ratio, scores=args.scores) if args.scores else FactorizeConfig(ratio=args.ratio)
        add("factorize", config, calibrated=not args.scores)

    rows = result["rows"]
    print(f"\n| model | bytes (MB) | x original | wiki ppl | healed ppl | recovered | heal steps / s |")
    print("|---|---|---|---|---|---|---|")
    print(f"| original | {original['bytes'] / 1e6:.1f} | 1 | {original['ppl']:.3f} | | | |")
    for r in rows[1:]:
        print(f"| {r['row']} | {r['bytes'] / 1e6:.1f} | {r['bytes'] / original['bytes']:.3f} | {r['ppl']:.3f} | "
              f"{r['healed_ppl']:.3f} | {r['recovered']:.1%} | {r['heal_steps']} / {r['heal_seconds']:.0f} |")
    by = {r["row"].split("-")[0]: r for r in rows[1:]}
    if "width_prune" in by:
        rec = by["width_prune"]["recovered"]
        print(f"\nwidth_prune {args.ratio}: healing recovered {rec:.1%} of the loss "
              f"({'meets' if rec >= 0.6 else 'MISSES'} >= 60%)")
    if "layer_prune" in by and ({"width_prune", "factorize"} & set(by)):
        for key in ("ppl", "healed_ppl"):
            best = min((by[k] for k in ("width_prune", "factorize") if k in by), key=lambda r: r[key])
            print(f"{key}: best of width_prune/factorize {best['row']} {best[key]:.3f} vs {by['layer_prune']['row']} "
                  f"{by['layer_prune'][key]:.3f} ({'beats' if best[key] < by['layer_prune'][key] else 'does NOT beat'})")


if __name__ == "__main__":
    main()
