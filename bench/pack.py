"""Lossless packing against plain zstd and ZipNN on the default model in fp32, bf16 and fp16.

For each dtype a copy of the packaged model's safetensors file is made (cast from its fp32
weights) and coded by: llmshrink pack (its default, and with ZipNN's fixed split, rot=1, as an
ablation), plain zstd on the whole file (one frame, python zstandard, the same level), and the
`zipnn` package's byte API (`ZipNN(input_format="byte", bytearray_dtype=...)`, what its file
scripts call). Every decode is checked against the original's sha256. Our default decode also
runs with `verify="both"` (what `llmshrink unpack --verify-file` does) as an extra row.

    python bench/pack.py --threads 2 --repeats 3

Decode GB/s = original bytes / seconds, best of --repeats, in memory (the file is in the page
cache); llmshrink's includes checking every chunk's recorded XXH3-128 checksum (and, in the
--verify-file row, the whole file's sha256). "cpu s" is the process CPU time of that decode and "cpu s/GB" that per
original GB, the figure least moved by other work on the machine; "cpu-bound GB/s" = bytes /
(cpu s / threads) estimates what the decoder's threads would reach on idle cores (an upper
bound: it assumes perfect scaling). The load average is printed before, between and after.
zipnn is optional: `pip install -c constraints.txt zipnn` (it builds a C extension).
Then (unless --no-compose) the Deep Compression composition: packed ratios of magnitude-pruned
bf16 copies (50% unstructured, 2:4) and of a 4-bit GPTQ checkpoint of the model.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import torch
import zstandard
from safetensors.torch import load_file, save_file

from llmshrink import resolve_model
from llmshrink.pack import codec as pack_codec
from llmshrink.pack import planes as pack_planes

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ZIPNN_DTYPE = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def best_of(fn, repeats: int) -> tuple[float, float, bytes | None]:
    """(best wall seconds, CPU seconds of that run, last result) of `fn()`."""
    best, cpu, out = float("inf"), 0.0, None
    for _ in range(repeats):
        c0, t0 = cpu_seconds(), time.perf_counter()
        out = fn()
        wall = time.perf_counter() - t0
        if wall < best:
            best, cpu = wall, cpu_seconds() - c0
    return best, cpu, out


def ours(src: Path, digest: str, work: Path, level: int, threads: int, repeats: int,
         rotations: range | None = None, verify_file: bool = False) -> dict:
    saved = pack_planes.ROTATIONS
    if rotations is not None:  # ablation: a fixed rotation (the reader checks it against this too)
        pack_planes.ROTATIONS = rotations
    try:
        dst = work / (src.name + ".llmpack")
        t0 = time.perf_counter()
        info = pack_codec.encode_file(src, dst, level=level, threads=threads)
        encode = time.perf_counter() - t0
        assert hashlib.sha256(pack_codec.decode_file(dst, threads)).hexdigest() == digest == info["sha256"]

        def decode(verify: str) -> None:  # iter_decoded checks the digests itself: a mismatch raises
            for _ in pack_codec.iter_decoded(dst, threads=threads, verify=verify):
                pass

        wall, cpu, _ = best_of(lambda: decode("chunks"), repeats)
        both = best_of(lambda: decode("both"), repeats) if verify_file else (0.0, 0.0, None)
        return {"packed": dst.stat().st_size, "encode": encode, "decode": wall, "cpu": cpu, "threads": threads,
                "decode_both": both[0], "cpu_both": both[1]}
    finally:
        pack_planes.ROTATIONS = saved


def plain_zstd(data: bytes, digest: str, level: int, threads: int, repeats: int) -> dict:
    t0 = time.perf_counter()
    packed = zstandard.ZstdCompressor(level=level, threads=threads).compress(data)  # one frame
    encode = time.perf_counter() - t0
    wall, cpu, out = best_of(lambda: zstandard.ZstdDecompressor().decompress(packed), repeats)
    assert hashlib.sha256(out).hexdigest() == digest
    return {"packed": len(packed), "encode": encode, "decode": wall, "cpu": cpu, "threads": 1}


def zipnn(data: bytes, digest: str, dtype: str, threads: int, repeats: int) -> dict | str:
    try:
        from zipnn import ZipNN
    except ImportError:
        return "not installed"
    z = ZipNN(input_format="byte", bytearray_dtype=ZIPNN_DTYPE[dtype], threads=threads)
    copy = bytearray(data)  # zipnn 0.5.4 rearranges its input buffer in place
    t0 = time.perf_counter()
    packed = z.compress(copy)
    encode = time.perf_counter() - t0
    wall, cpu, out = best_of(lambda: z.decompress(packed), repeats)
    assert hashlib.sha256(out).hexdigest() == digest, "zipnn did not give the original bytes back"
    return {"packed": len(packed), "encode": encode, "decode": wall, "cpu": cpu, "threads": threads}


def _prune(w: torch.Tensor, pattern: str) -> torch.Tensor:
    """Magnitude pruning of a [out, in] weight: half of each row (unstructured) or 2 of every 4 (2:4)."""
    if pattern == "2:4":
        groups = w.reshape(-1, 4)
        keep = groups.abs().argsort(dim=1)[:, 2:]
        return torch.zeros_like(groups).scatter(1, keep, groups.gather(1, keep)).reshape(w.shape)
    cut = w.abs().kthvalue(w.shape[1] // 2, dim=1, keepdim=True).values
    return torch.where(w.abs() > cut, w, torch.zeros_like(w))


def compose(source: Path, level: int, threads: int) -> None:
    """Deep Compression's last step: how well pruned zeros and quantized codes pack (ratios only).

    Pruned copies: bf16, every decoder linear magnitude-pruned (the embedding kept). Quantized:
    the default model as a 4-bit g128 RTN GPTQ checkpoint (int32 codes, fp16 scales/zeros, fp16
    embedding), packed as a folder."""
    from llmshrink import GPTQConfig, quantize
    from llmshrink.pack import pack_folder

    print("\nDeep Compression composition (ratio = original bytes / packed bytes, ours, level "
          f"{level}):\n| checkpoint | original MB | packed MB | ratio |\n|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="llmshrink-bench-compose-") as tmp:
        tensors = load_file(str(source))
        for pattern in ("50% unstructured", "2:4"):
            pruned = {k: (_prune(v, "2:4" if pattern == "2:4" else "half") if ".layers." in k and v.dim() == 2 else v)
                      .to(torch.bfloat16) for k, v in tensors.items()}
            path, out = Path(tmp) / "pruned.safetensors", Path(tmp) / "pruned.llmpack"
            save_file(pruned, str(path), metadata={"format": "pt"})
            packed = pack_codec.encode_file(path, out, level=level, threads=threads)["packed_size"]
            size = path.stat().st_size
            print(f"| bf16, decoder linears {pattern} magnitude-pruned | {size / 1e6:.1f} | {packed / 1e6:.1f} | "
                  f"{size / packed:.3f} |", flush=True)
        del tensors
        q = quantize(str(source.parent), GPTQConfig(bits=4, group_size=128, algorithm="rtn", clip_search=False),
                     Path(tmp) / "q", progress=False)
        summary = pack_folder(q, Path(tmp) / "qp", level=level, threads=threads)
        print(f"| GPTQ 4-bit g128 (RTN) checkpoint | {summary.tensor_bytes / 1e6:.1f} | "
              f"{summary.packed_bytes / 1e6:.1f} | {summary.ratio:.3f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtypes", default="fp32,bf16,fp16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--level", type=int, default=pack_codec.DEFAULT_LEVEL, help="ours and plain zstd")
    parser.add_argument("--no-zipnn", action="store_true")
    parser.add_argument("--work", help="folder for the copies (default: a temp folder, removed after)")
    parser.add_argument("--no-compose", action="store_true", help="skip the prune/quantize -> pack ratios")
    args = parser.parse_args()

    work = Path(args.work or tempfile.mkdtemp(prefix="llmshrink-bench-pack-"))
    work.mkdir(parents=True, exist_ok=True)
    source = Path(resolve_model(args.model)) / "model.safetensors"
    print(f"model={args.model} threads={args.threads} repeats={args.repeats} level={args.level} "
          f"cpus={os.cpu_count()} load at start={os.getloadavg()[0]:.2f}", flush=True)
    rows = []
    try:
        for name in args.dtypes.split(","):
            path = work / f"{name}.safetensors"
            if name == "fp32":
                shutil.copyfile(source, path)
            else:
                save_file({k: v.to(DTYPES[name]) for k, v in load_file(str(source)).items()}, str(path),
                          metadata={"format": "pt"})
            data = path.read_bytes()
            t0 = time.perf_counter()
            digest = hashlib.sha256(data).hexdigest()
            print(f"{name}: sha256 of the file alone takes {time.perf_counter() - t0:.2f} s", flush=True)
            default = ours(path, digest, work, args.level, args.threads, args.repeats, verify_file=True)
            results = {
                f"llmshrink pack (level {args.level})": default,
                "same, decoded with --verify-file": {**default, "decode": default["decode_both"],
                                                     "cpu": default["cpu_both"]},
                "llmshrink pack, fixed rot=1 (ZipNN's split)": ours(path, digest, work, args.level, args.threads,
                                                                    args.repeats, range(1, 2)),
                f"zstd -{args.level}, whole file": plain_zstd(data, digest, args.level, args.threads, args.repeats),
            }
            if not args.no_zipnn:
                results["zipnn 0.5.4 byte API"] = zipnn(data, digest, name, args.threads, args.repeats)
            for method, r in results.items():
                rows.append((name, len(data), method, r))
                if isinstance(r, str):
                    print(f"{name} {method}: {r}", flush=True)
                    continue
                print(f"{name} {method}: {len(data) / r['packed']:.4f}x", flush=True)
            path.unlink()
            print(f"load after {name}={os.getloadavg()[0]:.2f}", flush=True)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)

    if not args.no_compose:
        compose(source, args.level, args.threads)
    print(f"\nload at end={os.getloadavg()[0]:.2f}\n")
    print("| dtype | method | original MB | packed MB | ratio | encode s | decode GB/s | decode cpu s | "
          "cpu s/GB | cpu-bound GB/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, size, method, r in rows:
        if isinstance(r, str):
            print(f"| {name} | {method} | {size / 1e6:.1f} | {r} | | | | | | |")
            continue
        bound = size / (r["cpu"] / r["threads"]) / 1e9  # if the decode had its threads' cores to itself
        print(f"| {name} | {method} | {size / 1e6:.1f} | {r['packed'] / 1e6:.1f} | {size / r['packed']:.4f} | "
              f"{r['encode']:.2f} | {size / r['decode'] / 1e9:.2f} | {r['cpu']:.2f} | {r['cpu'] / (size / 1e9):.2f} | "
              f"{bound:.2f} |")
    ratios = {}
    for name, size, method, r in rows:
        if not isinstance(r, str):
            ratios.setdefault(name, {})[method.split(" ")[0] + (" rot1" if "rot=1" in method else "")] = r["packed"]
    for name, packed in ratios.items():
        if "zipnn" in packed:
            print(f"{name}: ours / zipnn ratio = {packed['zipnn'] / packed['llmshrink']:.4f}")


if __name__ == "__main__":
    main()
