"""`python -m llmshrink.kernels.aot`: compile every Triton kernel of llmshrink for NVIDIA GPUs on a
machine without one, and report registers, spills and shared memory per block shape.

The compiler itself is `llmshrink.kernels.gpu_compile` (its names are exported here too); this
module lists the cases: every block shape of each autotune space in the common layouts, and
every code path in the first block shape of each space.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import torch

from . import onebit, triton_gptq
from .gpu_compile import TRITON_TYPE, compile_for_gpu, gpu_compiler_available

__all__ = ["TRITON_TYPE", "compile_for_gpu", "gpu_compiler_available", "main"]

# Shared memory one program may use, per architecture (bytes; CUDA's opt-in maximum per block).
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


def _cases():
    """(kernel, label, first in its space, compile arguments) for llmshrink's Triton kernels: every
    block shape of each autotune space in the common layouts, and every code path (bits, activation
    dtype, group handling, bias) in the first block shape of each space."""
    short = TRITON_TYPE
    layouts = ((torch.float16, 128, False), (torch.bfloat16, 128, True), (torch.bfloat16, 0, True))
    for kind, space in triton_gptq.CONFIGS.items():
        for i, config in enumerate(space):
            for dtype, group, bias in layouts:
                yield (f"gptq-{kind}", f"#{i} 4-bit {short[dtype]} group {group}{' bias' if bias else ''}", i == 0,
                       dict(config=config, dtype=dtype, bits=4, group_size=group, has_bias=bias))
        for bits in (2, 3, 4, 8):
            for dtype in short:
                for group in (0, 32, 128):  # g_idx per row, a group per row by position, a group per tile
                    if bits == 4 and (dtype, group, True) in layouts:
                        continue  # compiled above
                    yield (f"gptq-{kind}", f"#0 {bits}-bit {short[dtype]} group {group} bias", True,
                           dict(config=space[0], dtype=dtype, bits=bits, group_size=group, has_bias=True))
        i, once = next((i, c) for i, c in enumerate(space) if c["WORDS_ONCE"])  # its word loads for other widths
        for bits in (2, 3, 8):
            yield (f"gptq-{kind}", f"#{i} {bits}-bit fp16 group 128", False,
                   dict(config=once, dtype=torch.float16, bits=bits, group_size=128))
    if getattr(onebit, "triton", None) is not None:
        for i, block in enumerate(onebit._SPACE):
            for dtype in short:
                yield "sign-1bit", f"#{i} {short[dtype]} per-row scale", i == 0, dict(block=block, dtype=dtype)
        for dtype in short:
            yield "sign-1bit", f"#0 {short[dtype]} one scale", True, dict(block=onebit._SPACE[0], dtype=dtype,
                                                                          per_row=False)


def _compile_case(kernel: str, arch: int, kwargs: dict) -> dict:
    try:
        report = (onebit if kernel == "sign-1bit" else triton_gptq).compile_report(**kwargs, arch=arch)
        return {**report, "fits": report["shared_bytes"] <= SHARED_LIMIT[arch]}
    except Exception as e:  # noqa: BLE001 - reported per case; the exit status says it failed
        while e.__cause__ is not None:  # Triton wraps the cause once per inlined call: keep the root
            e = e.__cause__
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        return {"error": f"{type(e).__name__}: {lines[-1][:300] if lines else ''}"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmshrink.kernels.aot",
                                     description="Compile llmshrink's Triton kernels for NVIDIA GPUs, no GPU needed, "
                                                 "and report registers, spills and shared memory per block shape.")
    parser.add_argument("--arch", type=int, action="append", choices=sorted(SHARED_LIMIT),
                        help="compute capability x10 (80 = A100, 89 = L4/RTX 4090, 90 = H100/H200); repeatable; "
                             "default 90")
    parser.add_argument("--json", action="store_true", help="one JSON list on stdout instead of a table")
    parser.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)),
                        help="compiler processes (default: the cores this process may use)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs {args.jobs}: give 1 or more compiler processes")
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("TRITON_INTERPRET=1 replaces the kernels with the CPU interpreter; unset it for this command")
    why = gpu_compiler_available()
    if why is not None:
        parser.error(f"cannot compile for a GPU here: {why}")
    cases = [(arch, *case) for arch in args.arch or [90] for case in _cases()]
    rows = []
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        results = pool.map(_compile_case, [c[1] for c in cases], [c[0] for c in cases], [c[4] for c in cases])
        try:
            results = list(results)
        except BrokenProcessPool:
            print("a compiler process died (out of memory, or a crash in Triton); rerun with --jobs 1 to see it",
                  file=sys.stderr)
            return 1
        for (arch, kernel, label, first, _), result in zip(cases, results):
            rows.append(row := {"arch": arch, "kernel": kernel, "case": label, "first": first, **result})
            if not args.json:
                what = row.get("error") or (f"{row['registers']:3d} regs  {row['spill_bytes']:5d} B spilled  "
                                            f"{row['shared_bytes'] // 1024:4d} KiB shared"
                                            f"{'' if row['fits'] else '  (over this GPU: the autotuner skips it)'}")
                print(f"sm_{arch}  {kernel:10s} {label:34s} {what}", flush=True)
    # Failures: a case that does not compile, or a first block shape (what runs untuned) that cannot launch.
    failed = [r for r in rows if "error" in r or (r["first"] and not r["fits"])]
    if args.json:
        print(json.dumps(rows))
    else:
        print(f"{len(rows)} compiled cases, {len(failed)} failed, "
              f"{sum(r.get('spill_bytes', 0) > 0 for r in rows)} spill registers")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
