"""Compile a Triton kernel for an NVIDIA GPU on a machine that has none.

Triton's wheel carries ptxas, so a kernel can go all the way from Python to a cubin for, say, an
H100 (sm_90) on a CPU-only CI machine. That catches what the CPU interpreter lets through (a
`tl.dot` under 16 wide, a reshape or a cast the GPU compiler refuses, a branch the interpreter
never traced) and says what each block shape costs in registers, spills and shared memory: the
nearest one gets to a kernel's speed without the GPU.

    report = compile_for_gpu(_entry, {"x_ptr": "*fp16", ..., "BITS": "constexpr"}, {"BITS": 4}, arch=90)
    report["registers"], report["spill_bytes"], report["shared_bytes"]

Arguments named in `aligned` are compiled as the launcher compiles them when the pointer or the
integer is a multiple of 16 (what real tensors and shapes give), so the code is the code a GPU runs.
Each kernel module's `compile_report` calls this; `python -m llmshrink.kernels.aot` runs them all.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path

import torch

__all__ = ["TRITON_TYPE", "compile_for_gpu", "gpu_compiler_available"]

TRITON_TYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}  # signature names


def _tool(name: str) -> Path | None:
    try:  # triton is optional (Linux only): probed here, never at import
        import triton.backends.nvidia as nvidia
    except ImportError:
        return None
    path = Path(nvidia.__file__).parent / "bin" / name
    return path if path.exists() else None


def gpu_compiler_available() -> str | None:
    """None when kernels can be compiled for NVIDIA GPUs here, else why not."""
    try:  # triton is optional (Linux only): probed here, never at import
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    missing = [name for name in ("ptxas", "cuobjdump") if _tool(name) is None]
    return f"triton's NVIDIA backend lacks {', '.join(missing)}" if missing else None


def compile_for_gpu(fn, signature: dict[str, str], constexprs: dict, *, arch: int = 90, num_warps: int = 4,
                    num_stages: int = 2, aligned: tuple[str, ...] = ()) -> dict:
    """Compile the @triton.jit `fn` for sm_`arch`; {"registers", "spill_bytes", "shared_bytes"}.

    `signature` maps every argument to its Triton type ("*fp16", "i32", "constexpr"); `constexprs`
    gives the constexpr values. Raises triton's CompilationError (or ptxas's error) when it fails."""
    why = gpu_compiler_available()
    if why is not None:
        raise RuntimeError(f"cannot compile for a GPU here: {why}; install triton for Linux x86_64")
    import triton  # optional and heavy: imported once it is known to be there
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if not hasattr(fn, "cache_key"):
        raise RuntimeError(f"{getattr(fn, '__name__', fn)} was defined under TRITON_INTERPRET=1 (the CPU interpreter); "
                           "compile for a GPU in a process without it")
    unknown = sorted(set(signature) - set(fn.arg_names)) + sorted(set(constexprs) - set(signature))
    if unknown:
        raise ValueError(f"{fn.__name__} has no argument {unknown[0]!r}; name arguments as the kernel does")
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages})
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        done = subprocess.run([str(_tool("cuobjdump")), "--dump-resource-usage", str(cubin)], capture_output=True,
                              text=True)
        if done.returncode:
            raise RuntimeError(f"cuobjdump could not read the cubin: {done.stderr.strip()[-300:]}")
        usage = done.stdout
    fields = dict(re.findall(r"\b(REG|STACK|LOCAL):(\d+)", usage))
    return {"registers": int(fields["REG"]), "spill_bytes": int(fields["LOCAL"]) + int(fields["STACK"]),
            "shared_bytes": kernel.metadata.shared}
