"""Weight sharing against uniform RTN at the same bits, and the Deep Compression chain, in one run.

Rows (each made by the CLI in its own child process, timed, its peak RSS sampled, then loaded by
llmshrink and scored on the same held-out `wiki` windows, the corpus's first passages; the
calibration windows come from its other half, seed 0):

- `share`: `llmshrink share --bits B` (H-weighted k-means, a codebook per output row);
- `share-plain`: the same with `--no-weighted` (plain k-means, Deep Compression's sharing);
- `share-tensor`: `--per tensor` (one codebook per linear: the fewest bits per weight);
- `rtn`: `llmshrink quantize --method rtn --no-clip-search --bits B --group-size G`.

Each row's decoder linears are sized in stored bits per weight, everything they need counted
(codes and fp16 codebooks; codes, zeros, scales and g_idx), and the checkpoint in MB. Then
`recipes/deep_compression.yaml` (weight_prune 50% Wanda -> share -> pack) runs through
`llmshrink run` with the same calibration, and its weights on disk after each stage are printed
with the perplexity of the pruned and the final model.

    python bench/share.py [--bits 3] [--nsamples 128] [--seqlen 512] [--eval-windows 40] [--json runs/share.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from llmshrink import load_tokenizer, resolve_model
from llmshrink.io import folder_size
from llmshrink.safetensors_io import TensorIndex
from quantize import held_out_ids, linear_bits, ppl_of, run_measured  # bench/quantize.py

HERE = Path(__file__).resolve().parent
RECIPE = HERE.parent / "recipes" / "deep_compression.yaml"

# key in --rows -> (the row's name, its command after `python -m llmshrink`, given the bits)
ROWS = {
    "share": ("share (H-weighted k-means, per row)", lambda bits, gs: ["share", "--bits", bits]),
    "share-plain": ("share (plain k-means, per row)", lambda bits, gs: ["share", "--bits", bits, "--no-weighted"]),
    "share-tensor": ("share (H-weighted k-means, per tensor)",
                     lambda bits, gs: ["share", "--bits", bits, "--per", "tensor"]),
    "rtn": ("RTN (llmshrink, no clip search)",
            lambda bits, gs: ["quantize", "--method", "rtn", "--no-clip-search", "--bits", bits, "--group-size", gs]),
}


def shared_linear_bits(folder: Path) -> float:
    """Stored bits per weight of a shared checkpoint's decoder linears: the packed codes as stored
    (padding included) and the fp16 codebooks."""
    index = TensorIndex(folder)
    record = json.loads((folder / "config.json").read_text())["llmshrink_share"]
    weights = round(sum(math.prod(index.shape(k)) for k in index.keys() if k.endswith(".codes") and ".layers." in k)
                    * 32 / record["config"]["bits"])  # codes stored per weight (padded inputs counted as weights)
    stored = sum(math.prod(index.shape(k)) * (32 if k.endswith(".codes") else 16) for k in index.keys()
                 if k.endswith((".codes", ".codebook")) and ".layers." in k)
    return stored / weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--bits", default="3")
    parser.add_argument("--group-size", type=int, default=128, help="RTN's group size")
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=40)
    parser.add_argument("--rows", default="share,share-plain,rtn", help=f"which rows: {', '.join(ROWS)}")
    parser.add_argument("--no-chain", action="store_true", help="skip the Deep Compression recipe")
    parser.add_argument("--pack-threads", type=int, default=None, help="the chain's pack coding threads (default: "
                                                                       "every core)")
    parser.add_argument("--work", default=None, help="folder for the checkpoints (default: a temp folder)")
    parser.add_argument("--json", default=None, help="write every row here")
    args = parser.parse_args()
    rows_wanted = [r for r in args.rows.split(",") if r]
    if set(rows_wanted) - set(ROWS):
        parser.error(f"unknown --rows {sorted(set(rows_wanted) - set(ROWS))}; known: {', '.join(ROWS)}")
    work = Path(args.work or tempfile.mkdtemp(prefix="llmshrink-bench-share-"))
    work.mkdir(parents=True, exist_ok=True)
    source, tokenizer = resolve_model(args.model), load_tokenizer(args.model)
    ids = held_out_ids(tokenizer, args.eval_windows, args.seqlen)
    index = TensorIndex(source)
    params = sum(math.prod(index.shape(k)) for k in index.keys())  # a tied embedding counted once
    base = ppl_of(source, ids, args.seqlen)
    print(f"model={args.model} nsamples={args.nsamples}x{args.seqlen} eval={args.eval_windows}x{args.seqlen} "
          f"torch={torch.__version__} threads={torch.get_num_threads()}", flush=True)
    print(f"unquantized ppl {base:.3f}", flush=True)

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cli = [sys.executable, "-m", "llmshrink"]
    calib = ["--nsamples", str(args.nsamples), "--calib-seqlen", str(args.seqlen)]
    rows = []
    for bits in [b for b in args.bits.split(",") if b]:
        for key in rows_wanted:
            name, command = ROWS[key]
            out = work / f"{key}-{bits}"
            shutil.rmtree(out, ignore_errors=True)
            seconds, rss, _ = run_measured(cli + command(bits, str(args.group_size)) + ["--model", args.model, *calib,
                                                                                       "--out", str(out)], env)
            mb = folder_size(out, (".safetensors",)) / 1e6
            row = {"key": key, "name": name, "bits": bits, "ppl": ppl_of(str(out), ids, args.seqlen),
                   "seconds": seconds, "rss": rss, "mb": mb, "params_bits": mb * 8e6 / params,
                   "linear_bits": shared_linear_bits(out) if key.startswith("share") else linear_bits(out)}
            print(json.dumps(row), flush=True)
            rows.append(row)

    chain = None
    if not args.no_chain:
        run = work / "deep_compression"
        sets = [f"model={args.model}", f"out={run}", "evaluate=null", f"calibration.nsamples={args.nsamples}",
                f"calibration.seqlen={args.seqlen}"]
        sets += [f"steps.2.threads={args.pack_threads}"] if args.pack_threads else []
        seconds, rss, _ = run_measured(cli + ["run", str(RECIPE), "--overwrite", "--no-progress"]
                                       + [a for s in sets for a in ("--set", s)], env)
        state = json.loads((run / "report.json").read_text())
        stages = [("original", state["original_weight_bytes"], base)] + [
            (f"{i + 1}. {s['method']}", s["weight_bytes"], None) for i, s in enumerate(state["steps"])]
        pruned = ppl_of(str(run / state["steps"][0]["folder"]), ids, args.seqlen)
        final = ppl_of(str(run / state["final"]), ids, args.seqlen)
        stages[1] = (*stages[1][:2], pruned)
        stages[-1] = (*stages[-1][:2], final)  # pack is lossless: the share stage scores the same
        chain = {"seconds": seconds, "rss": rss,
                 "stages": [{"stage": s, "mb": b / 1e6, "ppl": p} for s, b, p in stages]}
        print(json.dumps(chain), flush=True)

    if args.json:
        Path(args.json).write_text(json.dumps({"unquantized": base, "rows": rows, "chain": chain}, indent=1) + "\n")
    print("\n| bits | method | wiki ppl | gap to unquantized | time (s) | peak RSS (MB) | weights (MB) "
          "| linear bits/weight | bits/param |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| 32 | unquantized | {base:.3f} | - | - | - | {folder_size(source, ('.safetensors',)) / 1e6:.1f} | - | - |")
    for r in rows:
        print(f"| {r['bits']} | {r['name']} | {r['ppl']:.3f} | {r['ppl'] - base:+.3f} | {r['seconds']:.0f} | "
              f"{r['rss']:.0f} | {r['mb']:.1f} | {r['linear_bits']:.3f} | {r['params_bits']:.2f} |")
    if chain:
        print(f"\nDeep Compression ({RECIPE.name}, {chain['seconds']:.0f} s, peak RSS {chain['rss']:.0f} MB):\n")
        print("| stage | weights (MB) | wiki ppl |\n|---|---|---|")
        for s in chain["stages"]:
            print(f"| {s['stage']} | {s['mb']:.2f} | " + ("-" if s["ppl"] is None else f"{s['ppl']:.3f}") + " |")


if __name__ == "__main__":
    main()
