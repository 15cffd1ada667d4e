"""Delta compression of a real fine-tune: size on disk against the share of the domain gain kept.

The fine-tune is `recipes/finetune.py`'s default (SmolLM2-135M fully fine-tuned on LAMBADA's book
passages, cached). Every codec setting compresses it against the packaged base; each delta is
loaded back through `llmshrink.AutoModelForCausalLM` (hash-checked base + delta) and scored on the
held-out domain passages, next to the base and the fine-tune:

    gain kept = (ppl_base - ppl_delta) / (ppl_base - ppl_finetuned)
    size ratio = fp16 copy of the fine-tune (2 bytes per parameter) / delta folder on disk

    python bench/delta.py [--settings all|quick|NAME,NAME] [--eval-windows N] [--output results.json]
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch

from llmshrink import AutoModelForCausalLM, DeltaConfig, compress_delta, load_tokenizer, resolve_model
from llmshrink.finetune import domain_eval_text, finetuned_model
from llmshrink.evals import perplexity_of_ids
from llmshrink.io import folder_size
from llmshrink.safetensors_io import TensorIndex

SETTINGS = {
    "bitdelta": DeltaConfig(codec="bitdelta"),
    "bitdelta + distil 20": DeltaConfig(codec="bitdelta", distill_steps=20),  # slow on CPU: ~1 min per step
    "bitdelta rows": DeltaConfig(codec="bitdelta", scale_granularity="row"),
    "bitdelta embedding-exact-fp16": DeltaConfig(codec="bitdelta", exact=("*embed_tokens*",), exact_dtype="float16"),
    "lowrank r16": DeltaConfig(codec="lowrank", rank=16),
    "lowrank r64": DeltaConfig(codec="lowrank", rank=64),
    "dare p0.9": DeltaConfig(codec="dare", p=0.9),
    "dare p0.99": DeltaConfig(codec="dare", p=0.99),
    "mixed 2x8b+32x3b+64x2b": DeltaConfig(codec="mixed"),
}
QUICK = ("bitdelta", "lowrank r16", "dare p0.9", "mixed 2x8b+32x3b+64x2b")


def fp16_bytes(folder: str) -> int:
    index = TensorIndex(folder)
    return sum(2 * math.prod(index.shape(k)) for k in index.keys())


def domain_ppl(model, ids: torch.Tensor, seqlen: int) -> float:
    return perplexity_of_ids(model, ids, seqlen=seqlen).ppl


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settings", default="all", help="all, quick, or comma-separated setting names")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=None, help="score only the first N windows (default all)")
    ap.add_argument("--output", help="write the rows as JSON here")
    args = ap.parse_args()

    names = {"all": tuple(SETTINGS), "quick": QUICK}.get(args.settings) or tuple(args.settings.split(","))
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        raise SystemExit(f"unknown setting {unknown[0]!r}; known: {', '.join(SETTINGS)}")
    base = resolve_model("smollm2-135m")
    finetuned = str(finetuned_model())
    tokenizer = load_tokenizer(base)
    ids = torch.tensor(tokenizer(domain_eval_text()).input_ids, dtype=torch.long)
    if args.eval_windows:
        ids = ids[: args.eval_windows * args.seqlen]
    rows = []
    ppl = {}
    for name, path in (("base", base), ("fine-tuned", finetuned)):
        ppl[name] = domain_ppl(AutoModelForCausalLM.from_pretrained(path).eval(), ids, args.seqlen)
    full16 = fp16_bytes(finetuned)
    print(f"domain ppl ({len(ids)} tokens, seqlen {args.seqlen}): base {ppl['base']:.3f}, "
          f"fine-tuned {ppl['fine-tuned']:.3f}; fine-tune on disk {folder_size(finetuned, ('.safetensors',)) / 2**20:.1f} MiB "
          f"(fp32), fp16 copy {full16 / 2**20:.1f} MiB")
    with tempfile.TemporaryDirectory(prefix="llmshrink-bench-delta-") as tmp:
        for name in names:
            out = Path(tmp) / name.replace(" ", "_")
            start = time.perf_counter()
            compress_delta(base, finetuned, SETTINGS[name], out, progress=False)
            seconds = time.perf_counter() - start
            size = folder_size(out)
            model = AutoModelForCausalLM.from_pretrained(out).eval()
            p = domain_ppl(model, ids, args.seqlen)
            kept = (ppl["base"] - p) / (ppl["base"] - ppl["fine-tuned"])
            rows.append({"setting": name, "size_mib": size / 2**20, "ratio_vs_fp16": full16 / size, "ppl": p,
                         "gain_kept": kept, "seconds": seconds})
            print(f"{name:26s} {size / 2**20:8.2f} MiB  {full16 / size:6.1f}x smaller than fp16  ppl {p:.3f}  "
                  f"gain kept {100 * kept:5.1f}%  ({seconds:.0f} s)", flush=True)
    print("\n| setting | delta size (MiB) | vs fp16 copy | domain ppl | gain kept | compress time (s) |")
    print("|---|---|---|---|---|---|")
    print(f"| base | - | - | {ppl['base']:.3f} | 0% | - |")
    print(f"| fine-tuned (fp16 copy) | {full16 / 2**20:.1f} | 1.0x | {ppl['fine-tuned']:.3f} | 100% | - |")
    for r in rows:
        print(f"| {r['setting']} | {r['size_mib']:.2f} | {r['ratio_vs_fp16']:.1f}x | {r['ppl']:.3f} | "
              f"{100 * r['gain_kept']:.1f}% | {r['seconds']:.0f} |")
    if args.output:
        Path(args.output).write_text(json.dumps({"ppl": ppl, "fp16_bytes": full16, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
