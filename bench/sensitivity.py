"""Which sensitivity predicts the real cost of quantizing a linear: measured, not assumed.

A `--target-bits` checkpoint's mixed_precision.json holds, per decoder linear and width, two
predicted losses (gptq/sensitivity.py): the plain output error on the calibration inputs
("hessian") and the same weighted by the Fisher diagonal of the linear's outputs ("fisher"). This
script samples linears, quantizes each one alone (GPTQ on the full-precision model's inputs, as the
sensitivity pass does) at 2 and 3 bits, measures the held-out NLL increase, and prints each
predictor's rank correlation with it (over all points, and within one width, which is what an
allocation at a fixed budget trades).

    python bench/sensitivity.py --mixed /path/to/checkpoint --samples 40
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
from pathlib import Path

import torch

from llmshrink import load_tokenizer, resolve_model
from llmshrink.calibration import calibration_windows
from llmshrink.evals import load_corpus
from llmshrink.gptq.algorithm import accumulate_hessian
from llmshrink.gptq.config import GPTQConfig
from transformers import AutoModelForCausalLM


def spearman(a: list[float], b: list[float]) -> float:
    ra = torch.tensor(a).argsort().argsort().float()
    rb = torch.tensor(b).argsort().argsort().float()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def nll(model, ids: torch.Tensor) -> float:
    with torch.inference_mode():
        total = 0.0
        for window in ids:
            total += float(model(input_ids=window[None], labels=window[None]).loss)
    return total / len(ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mixed", required=True, help="a --target-bits checkpoint folder")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--samples", type=int, default=40)
    parser.add_argument("--bits", default="2,3")
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=512)
    args = parser.parse_args()
    record = json.loads((Path(args.mixed) / "mixed_precision.json").read_text())
    qc = json.loads((Path(args.mixed) / "config.json").read_text())["quantization_config"]
    config = GPTQConfig.from_dict({k: v for k, v in qc["llmshrink"]["config"].items()})
    calib_info = record["calibration"]
    tokenizer = load_tokenizer(args.model)
    calib = calibration_windows(tokenizer, "wiki", calib_info.get("nsamples", 128), calib_info.get("seqlen", 512),
                                seed=calib_info.get("seed", 0))
    ids = torch.tensor(tokenizer(load_corpus("wiki", 400)).input_ids)[: args.eval_windows * args.seqlen]
    ids = ids.reshape(args.eval_windows, args.seqlen)
    model = AutoModelForCausalLM.from_pretrained(resolve_model(args.model), dtype=torch.float32).eval()
    names = random.Random(0).sample(sorted(record["losses"]), args.samples)

    hessians = {n: [None, 0] for n in names}
    handles = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, a, n=n: hessians[n].__setitem__(slice(0, 2), accumulate_hessian(*hessians[n], a[0])))
        for n in names]
    with torch.inference_mode():
        for batch in calib.split(8):
            model(input_ids=batch)
    for h in handles:
        h.remove()

    base = nll(model, ids)
    print(f"base NLL {base:.4f} on {args.eval_windows}x{args.seqlen} held-out tokens; {len(names)} linears", flush=True)
    points = []  # (bits, measured dNLL, fisher, hessian)
    for n in names:
        linear = model.get_submodule(n)
        original = linear.weight.data.clone()
        for bits in [int(b) for b in args.bits.split(",")]:
            mconf = dataclasses.replace(config, bits=bits, dynamic={})
            H = hessians[n][0]
            linear.weight.data = mconf.solver.quantize(original, H, mconf).dequantized.to(original.dtype)
            delta = nll(model, ids) - base
            pred = record["losses"][n][str(bits)]
            points.append((bits, delta, pred["fisher"], pred["hessian"]))
            print(f"{n} {bits}-bit: dNLL {delta:+.5f} fisher {pred['fisher']:.3e} hessian {pred['hessian']:.3e}",
                  flush=True)
        linear.weight.data = original

    print("\n| points | predictor | Spearman with measured dNLL |\n|---|---|---|")
    groups = [("all", points)] + [(f"{b}-bit only", [p for p in points if p[0] == b])
                                  for b in sorted({p[0] for p in points})]
    for label, pts in groups:
        measured = [p[1] for p in pts]
        for i, predictor in ((2, "fisher-weighted output error"), (3, "plain output error (GPTQ loss)")):
            print(f"| {label} ({len(pts)}) | {predictor} | {spearman([p[i] for p in pts], measured):.3f} |")


if __name__ == "__main__":
    main()
