"""RTN, llmshrink GPTQ and GPTQModel side by side on the packaged model, in one run.

Every method quantizes the same model with the same calibration windows (the wiki corpus's
calibration half, seed 0) in its own child process, timed, with its peak RSS sampled; every
checkpoint is then loaded by llmshrink's GPTQ loader (GPTQModel's too: that is the interop check)
and scored on the same held-out `wiki` windows (the corpus's first passages), next to the
unquantized model.

    python bench/quantize.py --bits 4,3 --nsamples 128 --seqlen 512 --eval-windows 40 \
        --gptqmodel-python /path/to/venv-with-gptqmodel/bin/python

GPTQModel is a peer, never a dependency: install it in a separate venv
(`pip install -c constraints.txt "gptqmodel[hf]==7.6.0"`) and pass its python, or leave it out.
"""

from __future__ import annotations

import argparse
import json
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


def ppl_of(folder: str, ids: torch.Tensor, seqlen: int) -> float:
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.inference_mode():
        return perplexity_of_ids(model, ids, seqlen=seqlen, protocol="gptq").ppl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--bits", default="4,3")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=40)
    parser.add_argument("--gptqmodel-python", help="python of a venv with gptqmodel 7.6.0 installed")
    parser.add_argument("--work", default=None, help="folder for the checkpoints (default: a temp folder)")
    parser.add_argument("--rows", default="rtn,gptq,partial",
                        help="which of ours: rtn, gptq, partial (--partial-groups), rotated (llmshrink rotate, "
                             "then GPTQ; its time includes the rotation)")
    args = parser.parse_args()
    wanted = set(args.rows.split(","))
    if wanted - {"rtn", "gptq", "partial", "rotated"}:
        parser.error(f"unknown --rows {sorted(wanted - {'rtn', 'gptq', 'partial', 'rotated'})}")

    source = resolve_model(args.model)
    tokenizer = load_tokenizer(args.model)
    work = Path(args.work or tempfile.mkdtemp(prefix="llmshrink-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    calib = calibration_windows(tokenizer, "wiki", args.nsamples, args.seqlen, seed=0)
    calib_file = work / "calib.json"
    calib_file.write_text(json.dumps(calib.tolist()))
    # Held-out text: the first wiki passages (calibration draws from the second half only).
    eval_docs = 400
    assert eval_docs <= len(corpus_documents("wiki")) // 2
    ids = torch.tensor(tokenizer(load_corpus("wiki", eval_docs)).input_ids)[: args.eval_windows * args.seqlen]
    assert len(ids) == args.eval_windows * args.seqlen, "not enough held-out text for --eval-windows"
    base = ppl_of(source, ids, args.seqlen)
    print(f"model={args.model} nsamples={args.nsamples}x{args.seqlen} eval={args.eval_windows}x{args.seqlen} "
          f"torch={torch.__version__} threads={torch.get_num_threads()}", flush=True)
    print(f"unquantized ppl {base:.3f}", flush=True)

    rows = []
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    llmshrink_cli = [sys.executable, "-m", "llmshrink"]
    rotated, rotate_seconds = work / "rotated", 0.0
    if "rotated" in wanted:  # once, for every bit width
        shutil.rmtree(rotated, ignore_errors=True)
        rotate_seconds, _, _ = run_measured(llmshrink_cli + ["rotate", "--model", args.model, "--out", str(rotated)], env)
        print(f"rotated in {rotate_seconds:.0f} s", flush=True)
    for bits in [int(b) for b in args.bits.split(",")]:
        runs = {  # row name -> (its key in --rows, the command, the model it quantizes)
            "RTN (llmshrink)": ("rtn", ["quantize", "--method", "rtn", "--no-clip-search"], args.model),
            "GPTQ (llmshrink)": ("gptq", ["quantize"], args.model),
            # the layout before whole groups became the default: the requested size, partial last groups
            "GPTQ (llmshrink, --partial-groups)": ("partial", ["quantize", "--partial-groups"], args.model),
            "GPTQ (llmshrink, rotated)": ("rotated", ["quantize"], str(rotated)),
        }
        for name, (key, cmd, model) in runs.items():
            if key not in wanted:
                continue
            out = work / f"{key}-{bits}"
            shutil.rmtree(out, ignore_errors=True)
            cmd = llmshrink_cli + cmd + ["--model", model, "--bits", str(bits), "--group-size", str(args.group_size),
                                         "--nsamples", str(args.nsamples), "--calib-seqlen", str(args.seqlen),
                                         "--out", str(out)]
            seconds, rss, _ = run_measured(cmd, env)
            seconds += rotate_seconds if key == "rotated" else 0.0
            rows.append((bits, f"{name} g{stored_group_size(out)}", ppl_of(str(out), ids, args.seqlen), seconds, rss,
                         folder_size(out, (".safetensors",)) / 1e6))
            print(rows[-1], flush=True)
        if args.gptqmodel_python:
            out = work / f"gptqmodel-{bits}"
            shutil.rmtree(out, ignore_errors=True)
            # -I: none of our paths (bench/kernels.py would shadow the `kernels` package transformers probes)
            cmd = [args.gptqmodel_python, "-I", str(HERE / "_gptqmodel_child.py"), source, str(out), str(bits),
                   str(args.group_size), str(calib_file)]
            seconds, rss, _ = run_measured(cmd, {**env, "GPTQMODEL_CPU_WORKERS": "2"})
            rows.append((bits, f"GPTQModel 7.6.0 (defaults) g{stored_group_size(out)}", ppl_of(str(out), ids, args.seqlen),
                         seconds, rss, folder_size(out, (".safetensors",)) / 1e6))
            print(rows[-1], flush=True)

    print("\n| bits | method | wiki ppl | gap to unquantized | quantize time (s) | peak RSS (MB) | weights (MB) |")
    print("|---|---|---|---|---|---|---|")
    print(f"| 16/32 | unquantized | {base:.3f} | - | - | - | {folder_size(source, ('.safetensors',)) / 1e6:.1f} |")
    for bits, name, ppl, seconds, rss, size in rows:
        print(f"| {bits} | {name} | {ppl:.3f} | {ppl - base:+.3f} | {seconds:.0f} | {rss:.0f} | {size:.1f} |")
    for bits in sorted({r[0] for r in rows}):
        ours = next((r for r in rows if r[0] == bits and r[1].startswith("GPTQ (llmshrink) ")), None)
        peer = next((r for r in rows if r[0] == bits and r[1].startswith("GPTQModel")), None)
        if ours and peer:
            print(f"{bits}-bit: gap ratio llmshrink/GPTQModel {(ours[2] - base) / (peer[2] - base):.2f}x, "
                  f"time ratio {ours[3] / peer[3]:.2f}x")


if __name__ == "__main__":
    main()
