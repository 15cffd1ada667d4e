"""Low-rank factorization of the packaged model: perplexity against size, every size cut from one score map.

One scoring run (`--save-scores`: the calibration windows of the wiki corpus's calibration half,
seed 0, as bench/quantize.py draws them), then every --ratios size cut from that map (each cut
timed whole: load, hash check, allocation, slicing, save; no calibration); dedicated runs (the
default, sequential; with --unsequential also without, the run a cut equals) at the --dedicated
ratios; plain truncated SVD of the raw weights (no whitening, the same share of every linear) at
--plain. Every model is scored on the same held-out wiki windows (the corpus's first passages,
GPTQ protocol) next to the dense model.

    python bench/factorize.py --nsamples 128 --eval-windows 40 --ratios 0.95,0.9,0.85,0.8,0.7,0.6 \\
        --dedicated 0.9,0.8 --plain 0.8 --plot bench/factorize_size_ppl.png --json runs/factorize.json

The goals (issue 20): each cut within 2% ppl of the dedicated run at its size, and at 0.8 the
whitened + allocated gap to the dense model at most 0.3x plain SVD's gap.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

import llmshrink
from llmshrink import load_tokenizer, resolve_model
from llmshrink.calibration import Calibration
from llmshrink.factorize import FactorizeConfig
from llmshrink.factorize.method import score
from llmshrink.io import folder_size
from llmshrink.methods import Context

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quantize import held_out_ids, ppl_of  # noqa: E402


def ratios(text: str) -> list[float]:
    return [float(r) for r in text.split(",") if r.strip()]


def made(kind: str, config: FactorizeConfig, source: str, out: Path, calibration: Calibration | None,
         ids: torch.Tensor, seqlen: int) -> dict:
    """One row: `config` run on `source` into `out` (timed), its linear parameters and perplexity."""
    started = time.perf_counter()
    llmshrink.compress(source, config, out, calibration=calibration, progress=False, overwrite=True)
    seconds = time.perf_counter() - started
    parameters = json.loads((out / "config.json").read_text())["llmshrink_factorize"]["parameters"]
    row = {"kind": kind, "ratio": config.ratio, "kept_ratio": parameters["ratio"], "linear_params": parameters["kept"],
           "dense_linear_params": parameters["dense"], "seconds": round(seconds, 2), "ppl": ppl_of(str(out), ids, seqlen)}
    print(json.dumps(row), flush=True)
    return row


def plot(rows: list[dict], dense: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    styles = {"cut": ("o-", "cut from one score map"), "dedicated": ("s", "dedicated run (sequential)"),
              "dedicated, not sequential": ("x", "dedicated run, --no-sequential (what a cut equals)"),
              "plain": ("^", "plain SVD of the raw weights, uniform")}
    for kind, (style, label) in styles.items():
        pts = sorted((r for r in rows if r["kind"] == kind), key=lambda r: r["kept_ratio"])
        if pts:
            ax.plot([p["kept_ratio"] for p in pts], [p["ppl"] for p in pts], style, label=label, markersize=7)
    ax.axhline(dense, color="gray", linestyle="--", linewidth=1, label=f"dense {dense:.2f}")
    ax.set_xlabel("decoder linears' parameters kept (share of dense)")
    ax.set_ylabel("wiki perplexity (log scale)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def summarize(rows: list[dict], dense: float) -> None:
    """The issue's goals, from the rows."""
    cuts = {r["ratio"]: r for r in rows if r["kind"] == "cut"}
    for d in (r for r in rows if r["kind"].startswith("dedicated")):
        cut = cuts[d["ratio"]]
        off = 100 * (cut["ppl"] / d["ppl"] - 1)
        print(f"ratio {d['ratio']}: cut ppl {cut['ppl']:.3f} vs {d['kind']} {d['ppl']:.3f}: {off:+.2f}% "
              f"({'within' if abs(off) <= 2 else 'NOT within'} 2%)")
    for p in (r for r in rows if r["kind"] == "plain"):
        plain_gap = p["ppl"] - dense
        if plain_gap <= 0:
            print(f"ratio {p['ratio']}: plain SVD is no worse than dense ({p['ppl']:.3f}): no gap to compare with")
            continue
        for other in (r for r in rows if r["kind"] != "plain" and r["ratio"] == p["ratio"]):
            share = (other["ppl"] - dense) / plain_gap
            print(f"ratio {p['ratio']}: {other['kind']} gap {other['ppl'] - dense:.3f} = {share:.3g}x plain SVD's "
                  f"{plain_gap:.3f} ({'meets' if share <= 0.3 else 'MISSES'} <= 0.3x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=40)
    parser.add_argument("--ratios", default="0.95,0.9,0.85,0.8,0.7,0.6", help="sizes cut from the one score map")
    parser.add_argument("--dedicated", default="0.9,0.8", help="of those, the ratios also run on their own")
    parser.add_argument("--unsequential", action="store_true",
                        help="also run each --dedicated ratio with --no-sequential (the run a cut equals), which "
                             "tells the sequential walk's share of a cut's gap")
    parser.add_argument("--plain", default="0.8", help="ratios of plain truncated SVD of the raw weights")
    parser.add_argument("--work", default=None, help="folder for the map and the checkpoints (default: a temp folder)")
    parser.add_argument("--plot", default=None, help="write the size-vs-perplexity plot here (PNG)")
    parser.add_argument("--json", default=None, help="write every row here, after each one")
    args = parser.parse_args()
    cut_ratios, dedicated = ratios(args.ratios), ratios(args.dedicated)
    if set(dedicated) - set(cut_ratios):
        parser.error(f"--dedicated {sorted(set(dedicated) - set(cut_ratios))} are not among --ratios: "
                     "a dedicated run is there to compare with a cut")

    source = resolve_model(args.model)
    tokenizer = load_tokenizer(args.model)
    work = Path(args.work or tempfile.mkdtemp(prefix="llmshrink-bench-factorize-"))
    work.mkdir(parents=True, exist_ok=True)
    calibration = Calibration(source="wiki", nsamples=args.nsamples, seqlen=args.seqlen)
    ids = held_out_ids(tokenizer, args.eval_windows, args.seqlen)
    dense = ppl_of(source, ids, args.seqlen)
    print(f"model={args.model} nsamples={args.nsamples}x{args.seqlen} eval={args.eval_windows}x{args.seqlen} "
          f"torch={torch.__version__} threads={torch.get_num_threads()}", flush=True)
    print(f"dense ppl {dense:.3f}", flush=True)
    result = {"model": args.model, "nsamples": args.nsamples, "seqlen": args.seqlen, "eval_windows": args.eval_windows,
              "dense_ppl": dense, "rows": []}

    def add(row: dict) -> None:
        result["rows"].append(row)
        if args.json:
            tmp = Path(args.json).with_suffix(".tmp")
            tmp.write_text(json.dumps(result, indent=1) + "\n")
            tmp.replace(args.json)

    maps = work / "scores"
    started = time.perf_counter()
    # the CLI's `--save-scores MAP` alone, from Python: write only the map
    score(source, FactorizeConfig(save_scores=str(maps)), Context(calibration=calibration, overwrite=True, progress=False))
    result["scoring"] = {"seconds": round(time.perf_counter() - started, 2), "map_mb": round(folder_size(maps) / 1e6, 1)}
    print(f"score map written in {result['scoring']['seconds']:.0f} s, {result['scoring']['map_mb']:.1f} MB", flush=True)
    for ratio in cut_ratios:
        add(made("cut", FactorizeConfig(ratio=ratio, scores=str(maps)), source, work / f"cut-{ratio}", None, ids,
                 args.seqlen))
    for ratio in dedicated:
        add(made("dedicated", FactorizeConfig(ratio=ratio), source, work / f"dedicated-{ratio}", calibration, ids,
                 args.seqlen))
    for ratio in dedicated if args.unsequential else ():
        add(made("dedicated, not sequential", FactorizeConfig(ratio=ratio, sequential=False), source,
                 work / f"unsequential-{ratio}", calibration, ids, args.seqlen))
    for ratio in ratios(args.plain):
        add(made("plain", FactorizeConfig(ratio=ratio, whiten=False, allocate="uniform"), source,
                 work / f"plain-{ratio}", None, ids, args.seqlen))

    rows = result["rows"]
    print(f"\nscoring run: {result['scoring']['seconds']:.0f} s, score map {result['scoring']['map_mb']:.1f} MB")
    print("\n| run | ratio | linear params kept | wiki ppl | gap to dense | seconds |")
    print("|---|---|---|---|---|---|")
    print(f"| dense | 1 | {rows[0]['dense_linear_params'] if rows else '-'} | {dense:.3f} | - | - |")
    for r in rows:
        print(f"| {r['kind']} | {r['ratio']} | {r['linear_params']} ({r['kept_ratio']:.4f}) | {r['ppl']:.3f} | "
              f"{r['ppl'] - dense:+.3f} | {r['seconds']:.1f} |")
    print()
    summarize(rows, dense)
    if args.plot:
        plot(rows, dense, Path(args.plot), f"{args.model}: {args.nsamples} x {args.seqlen} calibration, "
                                           f"{args.eval_windows} held-out wiki windows x {args.seqlen}")
        print(f"plot written to {args.plot}")


if __name__ == "__main__":
    main()
