"""Low-bit matmul kernels side by side with dense matmul, in one process.

    python bench/kernels.py                 # CPU kernels + generation speed of the default model
    python bench/kernels.py --skip-generate # kernels only
    python bench/kernels.py --only-crossover # rows where dequantize + dense beats torch-int4/int8
    python bench/kernels.py --only-gpu      # the CUDA half alone (scripts/gpu_check.sh runs it)
    python bench/kernels.py --only-default-load # 4-bit checkpoint loaded with no dtype= vs fp32 original

CPU: every CPU kernel that serves a layer (4-bit g128 act-order, 8-bit g128 and 8-bit
per-channel) with bf16 activations (where torch's int4/int8 matmuls are fast) and fp32 ones,
against fp32 `F.linear` on the dense weight (and bf16 `F.linear` for reference), shapes in x out
576x1536, 1536x576, 4096x4096, 4096x11008, rows 1/8/64; then the default model generating
greedily, fp32 (and bf16) dense against its 4-bit g128 checkpoint (RTN: the weights' format is
what matters for speed) loaded in bf16 and in fp32, tokens/s.
GPU (when CUDA is there): the Triton kernel (4-bit g128) against fp16 `F.linear` (cuBLAS) at
rows 1/16/64/256 on 4096x4096, 4096x14336, 8192x28672, with device, torch and triton versions;
and the 1-bit delta kernel (`scale * (x @ sign.T)`, `--onebit`, also on CPU) against the same
dense matmul, i.e. the extra cost of serving a bitdelta beside the base.
Default load: the default model's 4-bit g128 checkpoint loaded with no `dtype=` (the dtype the
load rule picks for this machine) against the fp32 original, greedy decoding at batch 1 on
PROMPT, runs alternating in one process; prints the ratio and whether the first 32 tokens agree.
Ratios are dense time / kernel time: above 1 means the kernel is faster.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from llmshrink.gptq.linear import QuantLinear
from llmshrink.gptq.packing import pack_gptq
from llmshrink.kernels import KERNELS

PROMPT = "The history of the city begins"  # README's and `llmshrink eval`'s generation prompt
NEAR_TIE = 0.5  # nats between the top two next tokens: below it, rounding decides (as in tests/interop)
CPU_SHAPES = [(576, 1536), (1536, 576), (4096, 4096), (4096, 11008)]
GPU_SHAPES = [(4096, 4096), (4096, 14336), (8192, 28672)]


def random_layer(k: int, n: int, bits: int, group_size: int, act_order: bool, device="cpu") -> QuantLinear:
    g = torch.Generator().manual_seed(0)
    size = k if group_size == -1 else group_size
    groups = -(-k // size)
    codes = torch.randint(0, 2**bits, (n, k), generator=g, dtype=torch.int32)
    zeros = torch.full((groups, n), 2 ** (bits - 1))
    scales = torch.rand(groups, n, generator=g) * 0.02 + 0.002
    g_idx = torch.arange(k) // size
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=g)]
    return QuantLinear.from_packed(pack_gptq(codes, zeros, scales, g_idx, bits), bits, group_size,
                                   dtype=torch.float32).to(device)


def timed(fn, min_seconds: float = 0.3, cuda: bool = False) -> float:
    """Median seconds per call."""
    for _ in range(3):
        fn()
    times = []
    total = 0.0
    while total < min_seconds or len(times) < 5:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        total += times[-1]
    return statistics.median(times)


def bench_cpu() -> None:
    print(f"\nCPU kernels (torch {torch.__version__}, {torch.get_num_threads()} threads); ms per call; "
          "(x) = fp32 F.linear time / kernel time")
    columns = [("torch-int4", torch.bfloat16), ("torch-int8", torch.bfloat16), ("torch-dequant", torch.bfloat16),
               ("torch-dequant", torch.float32), ("reference", torch.float32)]
    print("| layer (in x out) | format | rows | fp32 F.linear | bf16 F.linear | "
          + " | ".join(f"{n} {str(d).removeprefix('torch.')}" for n, d in columns) + " |")
    print("|---|---|---|---|---|" + "---|" * len(columns))
    cpu = torch.device("cpu")
    for k, n in CPU_SHAPES:
        for bits, group, act in ((4, 128, True), (8, 128, False), (8, -1, False)):
            layer = random_layer(k, n, bits, group, act)
            dense = layer.dequantized_weight()
            dense16 = dense.bfloat16()
            kernels = {(name, d): KERNELS[name](layer, cpu, d) for name, d in columns
                       if KERNELS[name].supports(layer, cpu, d) is None}
            for rows in (1, 8, 64):
                x = torch.randn(rows, k)
                x16 = x.bfloat16()
                with torch.inference_mode():
                    base = timed(lambda: F.linear(x, dense))
                    cells = [f"{base * 1e3:.3f}"]
                    t = timed(lambda: F.linear(x16, dense16))
                    cells.append(f"{t * 1e3:.3f} ({base / t:.2f}x)")
                    for name, d in columns:
                        if (name, d) not in kernels or (name == "reference" and k * n > 2**22):
                            cells.append("-")
                            continue
                        xin = x16 if d == torch.bfloat16 else x
                        t = timed(lambda: kernels[name, d](xin), min_seconds=0.2)
                        cells.append(f"{t * 1e3:.3f} ({base / t:.2f}x)")
                fmt = f"{bits}-bit g{group}{' act-order' if act else ''}"
                print(f"| {k}x{n} | {fmt} | {rows} | " + " | ".join(cells) + " |", flush=True)


def bench_crossover(rows_list=(16, 64, 128, 256, 512, 1024)) -> None:
    """Where torch's weight-only matmuls stop paying: their time against dequantizing the weight
    once (torch-dequant) and a dense bf16 matmul, as rows grow (prefill, batched scoring).
    Sets torch-int4/torch-int8's DENSE_ROWS (the first row count where dequantize + dense wins on
    nearly every shape)."""
    from llmshrink.kernels.cpu import Int4CpuKernel, Int8CpuKernel, TiledDequantKernel

    print("\nCrossover, bf16 activations; ms per call; (x) = weight-only matmul time / torch-dequant time "
          "(above 1: dequantize + dense is faster)")
    print("| layer (in x out) | format | rows | bf16 F.linear | weight-only matmul | torch-dequant bf16 |")
    print("|---|---|---|---|---|---|")
    cpu, bf16 = torch.device("cpu"), torch.bfloat16
    for k, n in CPU_SHAPES:
        for bits, group, act in ((4, 128, False), (4, 128, True), (8, 128, False), (8, -1, False)):
            layer = random_layer(k, n, bits, group, act)
            dense16 = layer.dequantized_weight().bfloat16()
            quant = (Int4CpuKernel if bits == 4 else Int8CpuKernel)(layer, cpu, bf16)
            quant.dense_rows = 1 << 30  # its own matmul at every row count
            tiled = TiledDequantKernel(layer, cpu, bf16)
            for rows in rows_list:
                x16 = torch.randn(rows, k).bfloat16()
                with torch.inference_mode():
                    base = timed(lambda: F.linear(x16, dense16), min_seconds=0.1)
                    tq = timed(lambda: quant(x16), min_seconds=0.1)
                    td = timed(lambda: tiled(x16), min_seconds=0.1)
                fmt = f"{bits}-bit g{group}{' act-order' if act else ''}"
                print(f"| {k}x{n} | {fmt} | {rows} | {base * 1e3:.3f} | {tq * 1e3:.3f} | {td * 1e3:.3f} ({tq / td:.2f}x) |",
                      flush=True)


def bench_generate(new_tokens: int, prefill_rows: int = 4, prefill_len: int = 512) -> None:
    """Decoding (batch 1) and prefill / batched scoring (`prefill_rows` x `prefill_len` tokens, one
    forward) of the default model: dense fp32/bf16 against its 4-bit checkpoint, and that checkpoint
    with torch-int4's own matmul at every row count (no dense hand-off) to show what it buys."""
    from llmshrink import AutoModelForCausalLM, GPTQConfig, load_model, quantize

    model, tokenizer, source = load_model("smollm2-135m")
    prompt = tokenizer("The history of the city begins", return_tensors="pt").input_ids
    batch = torch.randint(0, model.config.vocab_size, (prefill_rows, prefill_len), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        out = quantize(source, GPTQConfig(bits=4, group_size=128, algorithm="rtn", clip_search=False), Path(tmp) / "q",
                       progress=False)
        models = {"fp32 dense": model, "bf16 dense": load_model("smollm2-135m", dtype="bfloat16")[0]}
        for dtype in (torch.bfloat16, torch.float32):
            m = AutoModelForCausalLM.from_pretrained(out, dtype=dtype)
            kinds = ", ".join(sorted({q.kernel.name for q in m.modules() if isinstance(q, QuantLinear)}))
            models[f"4-bit g128, {str(dtype).removeprefix('torch.')} ({kinds})"] = m
        m = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
        for q in m.modules():
            if isinstance(q, QuantLinear):
                q.kernel.dense_rows = 1 << 30
        models["4-bit g128, bfloat16 (torch-int4, no dense hand-off)"] = m
        decode, prefill = {}, {}
        for name, m in models.items():
            with torch.inference_mode():
                def run():
                    m.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
                decode[name] = new_tokens / timed(run, min_seconds=3.0)
                prefill[name] = batch.numel() / timed(lambda: m(batch, use_cache=False), min_seconds=3.0)
            print(f"  {name}: {decode[name]:.1f} tokens/s decoding, {prefill[name]:.0f} tokens/s prefill", flush=True)
    print(f"\nDefault model: decoding (greedy, {new_tokens} new tokens, batch 1) and prefill "
          f"({prefill_rows} x {prefill_len} tokens, one forward), tokens/s")
    print("| model | decode tokens/s | vs fp32 dense | prefill tokens/s | vs fp32 dense |")
    print("|---|---|---|---|---|")
    for name in models:
        print(f"| {name} | {decode[name]:.1f} | {decode[name] / decode['fp32 dense']:.2f}x "
              f"| {prefill[name]:.0f} | {prefill[name] / prefill['fp32 dense']:.2f}x |")


def bench_gpu() -> None:
    import triton

    from llmshrink.kernels import triton_gptq
    from llmshrink.kernels.triton_gptq import TritonKernel

    cuda = torch.device("cuda")
    print(f"\nGPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; "
          "speedup = fp16 F.linear (cuBLAS) time / Triton time, 4-bit g128; tuned = the autotuner's pick "
          "(BLOCK_M/N/K, SPLIT_K, WORDS_ONCE, warps)")
    print("| layer (in x out) | rows | fp16 cuBLAS ms | triton ms | speedup | tuned |")
    print("|---|---|---|---|---|---|")
    for k, n in GPU_SHAPES:
        layer = random_layer(k, n, 4, 128, act_order=False, device=cuda)
        dense = layer.dequantized_weight().half()
        kernel = TritonKernel(layer, cuda, torch.float16)
        for rows in (1, 16, 64, 256):
            x = torch.randn(rows, k, device=cuda, dtype=torch.float16)
            base = timed(lambda: F.linear(x, dense), cuda=True)
            t = timed(lambda: kernel(x), cuda=True)
            tuner = triton_gptq._gemv if rows <= triton_gptq.GEMV_MAX_ROWS else triton_gptq._gemm
            c = getattr(tuner, "best_config", None)
            tuned = "?" if c is None else "/".join(str(c.kwargs.get(name, "-")) for name in (
                "BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K", "WORDS_ONCE")) + f"/w{c.num_warps}"
            print(f"| {k}x{n} | {rows} | {base * 1e3:.4f} | {t * 1e3:.4f} | {base / t:.2f}x | {tuned} |", flush=True)


def bench_onebit(device: torch.device) -> None:
    from llmshrink.delta.algorithm import bitdelta
    from llmshrink.kernels.onebit import sign_matmul

    cuda = device.type == "cuda"
    dtype = torch.float16 if cuda else torch.float32
    shapes, row_set = (GPU_SHAPES, (1, 16, 64, 256)) if cuda else (CPU_SHAPES, (1, 8, 64))
    print(f"\n1-bit delta kernel on {torch.cuda.get_device_name() if cuda else 'CPU'} ({dtype}); "
          f"speedup = dense {dtype} F.linear time / sign_matmul time")
    print("| layer (in x out) | rows | dense ms | 1-bit ms | speedup |")
    print("|---|---|---|---|---|")
    for k, n in shapes:
        delta = torch.randn(n, k)
        parts = {name: t.to(device) for name, t in bitdelta(delta, "row").items()}
        dense = delta.to(device, dtype)
        del delta
        for rows in row_set:
            x = torch.randn(rows, k, device=device, dtype=dtype)
            base = timed(lambda: F.linear(x, dense), cuda=cuda)
            t = timed(lambda: sign_matmul(x, parts["sign"], parts["scale"], k), cuda=cuda)
            print(f"| {k}x{n} | {rows} | {base * 1e3:.4f} | {t * 1e3:.4f} | {base / t:.2f}x |", flush=True)


def bench_default_load(new_tokens: int = 64, rounds: int = 5, method: str = "gptq", checkpoint: str | None = None) -> None:
    """Decode tokens/s of the default model's 4-bit checkpoint (default settings) loaded with no `dtype=` against
    the fp32 original (what a user gets from either `from_pretrained` without arguments), in
    alternating runs; and whether their first 32 greedy tokens are equal. `checkpoint`: an existing
    4-bit checkpoint of the default model to use instead of quantizing one (GPTQ takes minutes)."""
    import transformers

    from llmshrink import AutoModelForCausalLM, GPTQConfig, load_model, quantize

    original, tokenizer, source = load_model("smollm2-135m")
    prompt = tokenizer(PROMPT, return_tensors="pt").input_ids
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        out = checkpoint or quantize(source, GPTQConfig(bits=4, algorithm=method, clip_search=method == "gptq"),
                                     Path(tmp) / "q", progress=False)
        group = json.loads((Path(out) / "config.json").read_text())["quantization_config"]["group_size"]
        print(f"  {'loaded' if checkpoint else f'quantized ({method}, 4-bit, default settings)'} {out} (g{group}) in "
              f"{time.perf_counter() - started:.0f} s", flush=True)
        models = {"fp32 original": original, "4-bit, no dtype=": AutoModelForCausalLM.from_pretrained(out)}
        plain = transformers.AutoModelForCausalLM.from_pretrained(out)
        exact = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)  # same checkpoint, fp32 compute
    dtype = models["4-bit, no dtype="].dtype
    kinds = ", ".join(sorted({q.kernel.name for q in models["4-bit, no dtype="].modules() if isinstance(q, QuantLinear)}))
    times: dict[str, list[float]] = {name: [] for name in models}
    tokens = {}
    with torch.inference_mode():
        for name, m in models.items():  # warm-up, and the tokens compared
            tokens[name] = m.generate(prompt, **{**kwargs, "max_new_tokens": 32, "min_new_tokens": 32})[0, prompt.shape[1]:]
        plain_tokens = plain.generate(prompt, **{**kwargs, "max_new_tokens": 32, "min_new_tokens": 32})[0, prompt.shape[1]:]
        exact_tokens = exact.generate(prompt, **{**kwargs, "max_new_tokens": 32, "min_new_tokens": 32})[0, prompt.shape[1]:]
        for _ in range(rounds):
            for name, m in models.items():
                start = time.perf_counter()
                m.generate(prompt, **kwargs)
                times[name].append(time.perf_counter() - start)
        # the original's own margin (top-1 minus top-2 log-probability) at each of its 32 greedy steps
        full = torch.cat([prompt[0], tokens["fp32 original"]])[None]
        logprobs = torch.log_softmax(original(full).logits[0, prompt.shape[1] - 1:-1].float(), -1)
        top2 = logprobs.topk(2, dim=-1).values
        margins = (top2[:, 0] - top2[:, 1]).tolist()
    speed = {name: new_tokens / statistics.median(t) for name, t in times.items()}
    same = torch.equal(tokens["fp32 original"], tokens["4-bit, no dtype="])
    first_diff = next((i for i, (a, b) in enumerate(zip(tokens["fp32 original"].tolist(),
                                                         tokens["4-bit, no dtype="].tolist())) if a != b), None)
    print(f"\nDefault load: greedy decoding, batch 1, {new_tokens} new tokens on {PROMPT!r}, "
          f"median of {rounds} alternating runs; the 4-bit checkpoint loads in {str(dtype).removeprefix('torch.')} "
          f"({kinds}), plain transformers loads it in {str(plain.dtype).removeprefix('torch.')}")
    print("| model | decode tokens/s | vs fp32 original |")
    print("|---|---|---|")
    for name in models:
        print(f"| {name} | {speed[name]:.1f} | {speed[name] / speed['fp32 original']:.2f}x |")
    print(f"first 32 greedy tokens equal to the fp32 original's: {same}"
          + ("" if same else f" (first difference at token {first_diff})")
          + f"; plain transformers' default load gives the same tokens as llmshrink's: "
            f"{torch.equal(plain_tokens, tokens['4-bit, no dtype='])}; the same checkpoint loaded in float32 gives "
            f"the same tokens: {torch.equal(exact_tokens, tokens['4-bit, no dtype='])}")
    if first_diff is not None:
        near = next((i for i, m in enumerate(margins) if m < NEAR_TIE), None)
        print(f"at token {first_diff} the fp32 original's own top-2 margin is {margins[first_diff]:.3f} nats; its "
              f"first near tie (< {NEAR_TIE} nats) is at token {near}: the 4-bit tokens "
              f"{'agree up to it' if near is not None and first_diff >= near else 'part before it'}")
    print(f"4-bit text: {tokenizer.decode(tokens['4-bit, no dtype='])!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-generate", action="store_true")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--onebit", action="store_true", help="also the 1-bit delta kernel (always on CUDA)")
    parser.add_argument("--only-onebit", action="store_true", help="only the 1-bit delta kernel")
    parser.add_argument("--only-crossover", action="store_true",
                        help="only the rows at which dequantize + dense beats torch's weight-only matmuls")
    parser.add_argument("--only-gpu", action="store_true", help="only the CUDA benchmarks (scripts/gpu_check.sh)")
    parser.add_argument("--only-default-load", action="store_true",
                        help="only the 4-bit checkpoint loaded with no dtype= against the fp32 original")
    parser.add_argument("--method", choices=("gptq", "rtn"), default="gptq", help="how the default-load checkpoint is made")
    parser.add_argument("--checkpoint", help="an existing 4-bit checkpoint of the default model for the default-load run")
    args = parser.parse_args()
    print(" ".join(sys.argv))
    if args.only_crossover:
        bench_crossover()
        return
    if args.only_default_load:
        bench_default_load(args.new_tokens, method=args.method, checkpoint=args.checkpoint)
        return
    if args.only_gpu:
        if not torch.cuda.is_available():
            sys.exit("--only-gpu: CUDA is not available on this machine; run it where `torch.cuda.is_available()`")
        bench_gpu()
        bench_onebit(torch.device("cuda"))
        return
    if not args.only_onebit:
        bench_cpu()
        if not args.skip_generate:
            bench_generate(args.new_tokens)
            bench_default_load(args.new_tokens, method=args.method)
    if args.onebit or args.only_onebit:
        bench_onebit(torch.device("cpu"))
    if torch.cuda.is_available():
        if not args.only_onebit:
            bench_gpu()
        bench_onebit(torch.device("cuda"))


if __name__ == "__main__":
    main()
