"""Peak RSS of layer-by-layer quantization does not grow with depth: N vs 2N layers, same width.

Random-weight Llama configs (the same width, N and 2N decoder layers) are saved to disk first;
each is quantized by `quantize_checkpoint` (GPTQ, 4-bit g128) in its own child process, with the
peak RSS of that process sampled. The goal: 2N layers at most 1.15x the peak of N layers.

    python bench/quantize_memory.py --layers 8 --hidden 768 --intermediate 3072
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quantize import run_measured  # noqa: E402


def child(src: str, out: str, nsamples: int, seqlen: int) -> None:
    from llmshrink.gptq.apply import quantize_checkpoint
    from llmshrink.gptq.config import GPTQConfig

    calib = torch.randint(0, 32000, (nsamples, seqlen), generator=torch.Generator().manual_seed(0))
    quantize_checkpoint(src, GPTQConfig(bits=4, group_size=128), calib, out, progress=False)


def save_random(folder: Path, layers: int, hidden: int, intermediate: int) -> int:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    return sum(p.numel() * 4 for p in model.model.layers.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8, help="N: the smaller model's depth")
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--intermediate", type=int, default=3072)
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--child", nargs=2, metavar=("SRC", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child, args.nsamples, args.seqlen)

    work = Path(tempfile.mkdtemp(prefix="llmshrink-mem-"))
    rows = []
    for n in (args.layers, 2 * args.layers):
        layer_bytes = save_random(work / f"src-{n}", n, args.hidden, args.intermediate)
        cmd = [sys.executable, __file__, "--child", str(work / f"src-{n}"), str(work / f"q-{n}"),
               "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen)]
        seconds, rss, _ = run_measured(cmd)
        rows.append((n, layer_bytes / 2**20, seconds, rss))
        print(rows[-1], flush=True)
    print(f"\nwidth {args.hidden}/{args.intermediate}, vocab 32000, calibration {args.nsamples}x{args.seqlen}, "
          f"torch {torch.__version__}")
    print("| decoder layers | fp32 layer weights (MB) | quantize time (s) | peak RSS (MB) |")
    print("|---|---|---|---|")
    for n, mb, seconds, rss in rows:
        print(f"| {n} | {mb:.0f} | {seconds:.0f} | {rss:.0f} |")
    print(f"peak RSS ratio {2 * args.layers} vs {args.layers} layers: {rows[1][3] / rows[0][3]:.3f}x (goal <= 1.15x)")


if __name__ == "__main__":
    main()
