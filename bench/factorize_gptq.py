"""GPTQ on a factorized model: both factors of every low-rank linear quantized as linears of their
own, against GPTQ on the dense model and the factorized model unquantized, on the packaged model.

Rows (each a folder on disk, the bytes of its safetensors files, its held-out wiki perplexity):
the dense model (as the package's converted folder stores it), GPTQ of the dense model, the
factorized model at --ratio (its factors as factorize saves them), and GPTQ of that factorized
folder (V with its step's other linears, then U on V's outputs; ranks padded with zeros to what
packing needs). The same calibration windows (the wiki corpus's calibration half, seed 0) serve
every step.

    python bench/factorize_gptq.py --ratio 0.9 --bits 4 --group-size 128 --json bench/factorize_gptq.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import llmshrink
from llmshrink import FactorizeConfig, GPTQConfig, load_tokenizer, resolve_model
from llmshrink.calibration import Calibration
from llmshrink.io import folder_size

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quantize import held_out_ids, ppl_of  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratio", type=float, default=0.9)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--eval-windows", type=int, default=40)
    parser.add_argument("--work", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    source = resolve_model(args.model)
    ids = held_out_ids(load_tokenizer(args.model), args.eval_windows, 512)
    work = Path(args.work or tempfile.mkdtemp(prefix="llmshrink-bench-factorize-gptq-"))
    calibration = Calibration(source="wiki", nsamples=args.nsamples, seqlen=512)
    gptq = GPTQConfig(bits=args.bits, group_size=args.group_size)
    rows = []

    def add(name: str, folder: Path, seconds: float) -> None:
        row = {"row": name, "bytes": folder_size(folder, (".safetensors",)), "seconds": round(seconds, 1), "ppl": ppl_of(str(folder), ids, 512)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps({"model": args.model, "ratio": args.ratio, "gptq": gptq.to_dict(),
                                                   "rows": rows}, indent=1) + "\n")

    def made(name: str, config, model: str | Path) -> Path:
        started = time.perf_counter()
        out = llmshrink.compress(str(model), config, work / name, calibration=calibration, overwrite=True,
                                 progress=False)
        add(name, out, time.perf_counter() - started)
        return out

    add("dense", Path(source), 0.0)
    made(f"gptq{args.bits}", gptq, source)
    factorized = made(f"factorize{args.ratio}", FactorizeConfig(ratio=args.ratio), source)
    made(f"factorize{args.ratio}+gptq{args.bits}", gptq, factorized)

    dense = rows[0]
    print("\n| model | MB of weights (safetensors) | x dense bytes | wiki ppl |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['row']} | {row['bytes'] / 1e6:.1f} | {row['bytes'] / dense['bytes']:.3f} | {row['ppl']:.3f} |")


if __name__ == "__main__":
    main()
