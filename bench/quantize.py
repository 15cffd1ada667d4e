"""RTN, llmshrink GPTQ (every option) and GPTQModel side by side on the packaged model, in one run.

Every method quantizes the same model with the same calibration windows (the wiki corpus's
calibration half, seed 0) in its own child process, timed, with its peak RSS sampled; every
checkpoint is then loaded by llmshrink's GPTQ loader (GPTQModel's too: that is the interop check)
and scored on the same held-out `wiki` windows (the corpus's first passages), next to the
unquantized model.

    python bench/quantize.py --bits 4,3 --nsamples 128 --seqlen 512 --eval-windows 40 \
        --gptqmodel-python /path/to/venv-with-gptqmodel/bin/python

The low-bit run (rotation, asymmetric grids, quantized embeddings, mixed precision, a plot):

    python bench/quantize.py --bits 8,4,3,2 --rows rtn,gptq,rotated,rotated-asym --budgets 2.5,3,3.5 \
        --plot bench/quantize_size_ppl.png --json runs/quantize.json

Each row's size is counted twice: the stored bits per weight of the decoder linears (codes,
zeros, scales and g_idx: what `--target-bits` budgets) and the checkpoint's bits per parameter
(every stored byte over the source model's parameters, embeddings included).

GPTQModel is a peer, never a dependency: install it in a separate venv
(`pip install -c constraints.txt "gptqmodel[hf]==7.6.0"`) and pass its python, or leave it out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

from llmshrink import AutoModelForCausalLM, load_tokenizer, resolve_model
from llmshrink.calibration import calibration_windows
from llmshrink.evals import load_corpus, perplexity_of_ids
from llmshrink.evals.data import corpus_documents
from llmshrink.io import folder_size
from llmshrink.safetensors_io import TensorIndex

HERE = Path(__file__).resolve().parent


def run_measured(cmd: list[str], env: dict | None = None) -> tuple[float, float, str]:
    """Run `cmd`; return (seconds, peak RSS in MB of it and its children, output tail)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    peak = [0]

    def sample():
        p = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                rss = p.memory_info().rss + sum(c.memory_info().rss for c in p.children(recursive=True))
                peak[0] = max(peak[0], rss)
            except psutil.Error:
                pass
            time.sleep(0.2)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    output = proc.communicate()[0]
    thread.join()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed:\n{output[-3000:]}")
    return time.perf_counter() - start, peak[0] / 2**20, output[-500:]


def stored_group_size(folder: Path) -> int:
    """The group size the checkpoint stores (llmshrink may lower the requested one to whole groups)."""
    return json.loads((Path(folder) / "config.json").read_text())["quantization_config"]["group_size"]


def linear_bits(folder: Path) -> float:
    """Stored bits per weight of the checkpoint's quantized decoder linears (codes, zeros, scales, g_idx)."""
    index = TensorIndex(folder)
    stored = weights = 0
    for key in index.keys():
        if key.endswith(".qweight") and ".layers." in key:
            module = key[: -len("qweight")]
            rows, cols = index.shape(key)
            in_features = index.shape(module + "g_idx")[0]
            bits = rows * 32 // in_features
            weights += in_features * cols
            stored += sum(math.prod(index.shape(module + n)) * {"qweight": 32, "qzeros": 32, "scales": 16,
                                                                 "g_idx": 32}[n]
                          for n in ("qweight", "qzeros", "scales", "g_idx"))
    return stored / weights


def held_out_ids(tokenizer, windows: int, seqlen: int) -> torch.Tensor:
    """The first `windows` x `seqlen` tokens of the first wiki passages (calibration draws from the
    corpus's second half only)."""
    eval_docs = 400
    assert eval_docs <= len(corpus_documents("wiki")) // 2
    ids = torch.tensor(tokenizer(load_corpus("wiki", eval_docs)).input_ids)[: windows * seqlen]
    assert len(ids) == windows * seqlen, "not enough held-out text for --eval-windows"
    return ids


def ppl_of(folder: str, ids: torch.Tensor, seqlen: int) -> float:
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.inference_mode():
        return perplexity_of_ids(model, ids, seqlen=seqlen, protocol="gptq").ppl


# key in --rows -> (the row's name, `llmshrink quantize` flags added to --bits/--group-size/calibration)
ROWS = {
    "rtn": ("RTN (llmshrink)", ["--method", "rtn", "--no-clip-search"]),
    "gptq": ("GPTQ (llmshrink defaults)", []),
    "partial": ("GPTQ (llmshrink, --partial-groups)", ["--partial-groups"]),
    "asym": ("GPTQ (llmshrink, --asym)", ["--asym"]),
    "rotated": ("GPTQ (llmshrink, --rotate hadamard)", ["--rotate", "hadamard"]),
    "rotated-asym": ("GPTQ (llmshrink, --rotate hadamard --asym)", ["--rotate", "hadamard", "--asym"]),
    "embed4": ("GPTQ (llmshrink, --embed-bits 4)", ["--embed-bits", "4"]),
    "embed8": ("GPTQ (llmshrink, --embed-bits 8)", ["--embed-bits", "8"]),
    "embed6": ("GPTQ (llmshrink, --embed-bits 6)", ["--embed-bits", "6"]),
    "fp-target": ("GPTQ (llmshrink, --fp-target 1)", ["--fp-target", "1"]),
    "fp-target-half": ("GPTQ (llmshrink, --fp-target 0.5)", ["--fp-target", "0.5"]),
    "rotated-asym-fp": ("GPTQ (llmshrink, --rotate hadamard --asym --fp-target 1)",
                        ["--rotate", "hadamard", "--asym", "--fp-target", "1"]),
    # a rotation unties a tied head (the final norm's scale folds into it): these also quantize it
    "rotated-asym-head": ("GPTQ (llmshrink, --rotate hadamard --asym --lm-head --embed-bits 6)",
                          ["--rotate", "hadamard", "--asym", "--lm-head", "--embed-bits", "6"]),
    "rotated-asym-fp-head": ("GPTQ (llmshrink, --rotate hadamard --asym --fp-target 1 --lm-head --embed-bits 6)",
                             ["--rotate", "hadamard", "--asym", "--fp-target", "1", "--lm-head", "--embed-bits", "6"]),
    "rotated-embed4": ("GPTQ (llmshrink, --rotate hadamard --lm-head --embed-bits 4)",
                       ["--rotate", "hadamard", "--lm-head", "--embed-bits", "4"]),
}


def plot(rows: list[dict], base: float, path: Path) -> None:
    """Size against perplexity, every point: decoder-linear bits per weight, and checkpoint MB."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    families: dict[str, list[dict]] = {}
    for r in rows:
        families.setdefault(r["family"].removesuffix(" (--target-bits)"), []).append(r)
    top = 30 * base  # points above are drawn at the top edge, marked with their value
    colors = plt.get_cmap("tab20").colors
    for ax, x, label in ((axes[0], "linear_bits", "decoder linears: stored bits per weight (scales, zeros, g_idx)"),
                         (axes[1], "mb", "checkpoint weights (MB)")):
        for k, (family, pts) in enumerate(families.items()):
            pts = sorted(pts, key=lambda r: r[x])
            ys = [min(p["ppl"], top) for p in pts]
            ax.plot([p[x] for p in pts], ys, marker="os^vD<>p*h"[k % 10], color=colors[k % 20], label=family)
            for p in pts:
                if p["ppl"] > top:
                    ax.annotate(f"{p['ppl']:.3g}", (p[x], top), fontsize=7, xytext=(3, -10), textcoords="offset points")
        ax.axhline(base, color="gray", linestyle="--", linewidth=1, label=f"unquantized {base:.2f}")
        ax.set_xlabel(label)
        ax.set_ylabel(f"wiki perplexity (log scale, cut at {top:.0f})")
        ax.set_yscale("log")
        ax.set_ylim(base * 0.95, top * 1.1)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("SmolLM2-135M: size against perplexity (40 held-out windows x 512, 128 x 512 calibration)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def quantize_row(cli: list[str], env: dict, key: str, name: str, flags: list[str], model: str, out: Path,
                 ids: torch.Tensor, args, bits: str) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = cli + ["quantize", *flags, "--model", model, "--bits", bits, "--group-size", str(args.group_size),
                 "--nsamples", str(args.nsamples), "--calib-seqlen", str(args.seqlen), "--out", str(out)]
    seconds, rss, _ = run_measured(cmd, env)
    return row_of(out, key, name, bits, seconds, rss, ids, args.seqlen, args.params, args.other_ids)


def row_of(out: Path, family: str, name: str, bits: str, seconds: float, rss: float, ids, seqlen: int,
           params: int, other=None) -> dict:
    """One row: the checkpoint at `out` scored (and on the `other` text's ids, if given), sized and
    timed; bits per parameter of the source's `params`."""
    mb = folder_size(out, (".safetensors",)) / 1e6
    row = {"family": family, "bits": bits, "name": f"{name} g{stored_group_size(out)}", "ppl": ppl_of(str(out), ids, seqlen),
           "seconds": seconds, "rss": rss, "mb": mb, "linear_bits": linear_bits(out), "params_bits": mb * 8e6 / params}
    if other is not None:
        row["ppl_other"] = ppl_of(str(out), other, seqlen)
    print(json.dumps(row), flush=True)
    return row


class Rows(list):
    """The rows measured so far, rewritten to `path` (if any) after each one, so a stopped run keeps them."""

    def __init__(self, path: Path | None, base: float, base_other: float | None):
        super().__init__()
        self.path, self.base, self.base_other = path, base, base_other

    def append(self, row: dict) -> None:
        super().append(row)
        if self.path:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"unquantized": self.base, "unquantized_other": self.base_other,
                                       "rows": list(self)}, indent=1) + "\n")
            tmp.replace(self.path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--bits", default="4,3")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=40)
    parser.add_argument("--gptqmodel-python", help="python of a venv with gptqmodel 7.6.0 installed")
    parser.add_argument("--gptqmodel-bits", default=None, help="GPTQModel's bit widths (default: --bits)")
    parser.add_argument("--work", default=None, help="folder for the checkpoints (default: a temp folder)")
    parser.add_argument("--rows", default="rtn,gptq,partial",
                        help=f"which of ours per bit width: {', '.join(ROWS)}; KEY@4/2 runs KEY at 4 and 2 bits only")
    parser.add_argument("--sensitivity", default=None,
                        help="a --target-bits checkpoint (same model and calibration) whose measured sensitivity "
                             "every mixed row reuses")
    parser.add_argument("--budgets", default="", help="mixed precision rows: --target-bits values, e.g. 2.5,3,3.5 "
                                                      "(the first measures the sensitivity, the others reuse it)")
    parser.add_argument("--mixed-flags", default="", help="flags for the mixed rows, e.g. '--rotate hadamard'")
    parser.add_argument("--plot", default=None, help="write the size-vs-perplexity plot here (PNG)")
    parser.add_argument("--json", default=None, help="write every row here")
    parser.add_argument("--also", default="", help="--json files of other runs (same protocol, comma-separated) whose "
                                                   "rows are added to the table and the plot, marked as from that run; "
                                                   "with --rows '' this only redraws")
    parser.add_argument("--other-text", default=None, choices=["lambada"],
                        help="also score every checkpoint on the first 20 windows of this corpus (text that "
                             "neither calibration nor the wiki windows come from)")
    args = parser.parse_args()
    wanted = {}  # row key -> the bit widths it runs at ("key@4/2": only those, else every --bits)
    for item in [r for r in args.rows.split(",") if r]:
        key, _, only = item.partition("@")
        wanted[key] = only.split("/") if only else [b for b in args.bits.split(",") if b]
    if set(wanted) - set(ROWS):
        parser.error(f"unknown --rows {sorted(set(wanted) - set(ROWS))}; known: {', '.join(ROWS)}")

    source = resolve_model(args.model)
    tokenizer = load_tokenizer(args.model)
    work = Path(args.work or tempfile.mkdtemp(prefix="llmshrink-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    calib = calibration_windows(tokenizer, "wiki", args.nsamples, args.seqlen, seed=0)
    calib_file = work / "calib.json"
    calib_file.write_text(json.dumps(calib.tolist()))
    ids = held_out_ids(tokenizer, args.eval_windows, args.seqlen)
    base = ppl_of(source, ids, args.seqlen)
    args.other_ids, base_other = None, None
    if args.other_text:
        args.other_ids = torch.tensor(tokenizer(load_corpus(args.other_text)).input_ids)[: 20 * args.seqlen]
        base_other = ppl_of(source, args.other_ids, args.seqlen)
        print(f"unquantized ppl on {args.other_text} {base_other:.3f}", flush=True)
    index = TensorIndex(source)
    args.params = sum(math.prod(index.shape(k)) for k in index.keys())  # a tied embedding counted once
    print(f"model={args.model} nsamples={args.nsamples}x{args.seqlen} eval={args.eval_windows}x{args.seqlen} "
          f"torch={torch.__version__} threads={torch.get_num_threads()}", flush=True)
    print(f"unquantized ppl {base:.3f}", flush=True)

    rows = Rows(Path(args.json) if args.json else None, base, base_other)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cli = [sys.executable, "-m", "llmshrink"]
    for bits in dict.fromkeys(b for widths in wanted.values() for b in widths):
        for key in [k for k, widths in wanted.items() if bits in widths]:
            name, flags = ROWS[key]
            rows.append(quantize_row(cli, env, key, name, flags, args.model, work / f"{key}-{bits}", ids, args, bits))
    mixed_flags = args.mixed_flags.split()
    first = args.sensitivity
    for budget in [b for b in args.budgets.split(",") if b]:
        flags = [*mixed_flags, "--target-bits", budget] + (["--sensitivity", str(first)] if first else [])
        out = work / f"mixed-{budget}"
        name = f"GPTQ (llmshrink, --target-bits {budget}{' ' + args.mixed_flags if mixed_flags else ''}" \
               f"{', sensitivity reused' if first else ''})"
        row = quantize_row(cli, env, "mixed" + (" rotated" if "--rotate" in mixed_flags else ""), name, flags,
                           args.model, out, ids, args, "4")
        rows.append({**row, "bits": f"{row['linear_bits']:.2f} avg"})
        first = first or out
    for bits in [b for b in (args.gptqmodel_bits or args.bits).split(",") if b] if args.gptqmodel_python else []:
        out = work / f"gptqmodel-{bits}"
        shutil.rmtree(out, ignore_errors=True)
        # -I: none of our paths (bench/kernels.py would shadow the `kernels` package transformers probes)
        cmd = [args.gptqmodel_python, "-I", str(HERE / "_gptqmodel_child.py"), source, str(out), bits,
               str(args.group_size), str(calib_file)]
        seconds, rss, _ = run_measured(cmd, {**env, "GPTQMODEL_CPU_WORKERS": "2"})
        rows.append(row_of(out, "GPTQModel 7.6.0", "GPTQModel 7.6.0 (defaults)", bits, seconds, rss, ids, args.seqlen, args.params,
                           args.other_ids))

    for also in [a for a in args.also.split(",") if a]:
        earlier = json.loads(Path(also).read_text())
        if abs(earlier["unquantized"] - base) > 1e-3:
            parser.error(f"{also} scored the unquantized model {earlier['unquantized']:.3f}, not {base:.3f}: "
                         "another protocol")
        rows += [{**r, "name": r["name"] + f" (from {Path(also).name})"} for r in earlier["rows"]]
    other = f" {args.other_text} ppl |" if args.other_text else ""
    print("\n| bits | method | wiki ppl | gap to unquantized |" + other + " quantize time (s) | peak RSS (MB) "
          "| weights (MB) | linear bits/weight | bits/param |")
    print("|---|---|---|---|" + ("---|" if other else "") + "---|---|---|---|---|")
    print(f"| 16/32 | unquantized | {base:.3f} | - |" + (f" {base_other:.3f} |" if other else "")
          + f" - | - | {folder_size(source, ('.safetensors',)) / 1e6:.1f} | - | - |")
    for r in rows:
        print(f"| {r['bits']} | {r['name']} | {r['ppl']:.3f} | {r['ppl'] - base:+.3f} |"
              + (f" {r.get('ppl_other', float('nan')):.3f} |" if other else "") + f" {r['seconds']:.0f} | "
              f"{r['rss']:.0f} | {r['mb']:.1f} | {r['linear_bits']:.3f} | {r['params_bits']:.2f} |")
    for bits in sorted({r["bits"] for r in rows}):
        ours = next((r for r in rows if r["bits"] == bits and r["family"] == "gptq"), None)
        peer = next((r for r in rows if r["bits"] == bits and r["family"].startswith("GPTQModel")), None)
        rotated = next((r for r in rows if r["bits"] == bits and r["family"] == "rotated"), None)
        if ours and peer:
            print(f"{bits}-bit: gap ratio llmshrink/GPTQModel {(ours['ppl'] - base) / (peer['ppl'] - base):.2f}x, "
                  f"time ratio {ours['seconds'] / peer['seconds']:.2f}x")
        if ours and rotated:
            print(f"{bits}-bit: rotated/plain time {rotated['seconds'] / ours['seconds']:.2f}x, "
                  f"gap {rotated['ppl'] - base:+.3f} against {ours['ppl'] - base:+.3f}")
    if args.plot:
        plot(rows, base, Path(args.plot))
        print(f"plot written to {args.plot}")


if __name__ == "__main__":
    main()
