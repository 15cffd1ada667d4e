"""The Triton kernels compile for real GPUs, on this machine without one.

The CPU interpreter checks the kernels' arithmetic (test_kernels.py) but not what only the GPU
compiler sees: dot shapes, layouts, casts, register and shared-memory use. Triton's wheel carries
ptxas, so `python -m llmshrink.kernels.aot` takes every kernel to an sm_90 (H100), sm_80 (A100)
and sm_89 (L4, RTX 4090: the least shared memory) cubin. It runs in a child process: the tests'
TRITON_INTERPRET=1 swaps the kernels for the interpreter's.
"""

import json
import os
import re
import subprocess
import sys

import pytest

from llmshrink.kernels.aot import gpu_compiler_available
from llmshrink.kernels.triton_gptq import CONFIGS

pytestmark = pytest.mark.skipif(gpu_compiler_available() is not None,
                                reason=f"no GPU compiler: {gpu_compiler_available()}")


ARCHS = (90, 80, 89)


def run_aot(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when it is unset
    return subprocess.run([sys.executable, "-m", "llmshrink.kernels.aot", *args], env=env, capture_output=True,
                          text=True, timeout=1200)


@pytest.fixture(scope="module")
def compiled():
    done = run_aot("--json", "--jobs", "2", *(f"--arch={arch}" for arch in ARCHS))
    assert done.stdout.strip(), done.stderr[-2000:]
    return done, json.loads(done.stdout.strip().splitlines()[-1])


def test_every_kernel_compiles_for_three_gpus(compiled):
    done, rows = compiled
    errors = [f"sm_{r['arch']} {r['kernel']} {r['case']}: {r['error']}" for r in rows if "error" in r]
    assert not errors, "\n".join(errors[:10])
    # Per architecture: every block shape in 3 layouts; per space every path (4 bits x 3 dtypes x 3
    # group modes, less the 2 compiled with the shapes) and 3 more widths with WORDS_ONCE; the sign
    # kernel's 4 shapes x 3 dtypes and its one-scale form in 3 dtypes.
    blocks = sum(len(space) for space in CONFIGS.values())
    assert len(rows) == len(ARCHS) * (3 * blocks + len(CONFIGS) * (34 + 3) + 15)
    assert {r["arch"] for r in rows} == set(ARCHS)
    assert done.returncode == 0, done.stderr[-2000:]


def test_untuned_block_shapes_fit_and_every_space_fits_somewhere(compiled):
    """The first block shape of a space is what runs untuned (LLMSHRINK_TRITON_AUTOTUNE=0); the
    autotuner skips shapes whose shared memory the GPU lacks, so each space must keep one that fits."""
    _, rows = compiled
    assert all(r.get("fits") for r in rows if r["first"])
    for arch in ARCHS:
        for kernel in {r["kernel"] for r in rows}:
            assert any(r.get("fits") for r in rows if r["arch"] == arch and r["kernel"] == kernel)


def test_common_layouts_never_spill(compiled):
    """Registers spilled to local memory cost every load of a tile; no block shape in the autotune
    spaces may spill for 4-bit g128 (the GPTQ default) in fp16 or bf16, or in the 16-bit sign kernel."""
    import triton

    if triton.__version__ != "3.9.0":  # constraints.txt pins it; other versions allocate registers differently
        pytest.skip(f"register use measured with triton 3.9.0, this is {triton.__version__}")
    _, rows = compiled
    spilling = [f"sm_{r['arch']} {r['kernel']} {r['case']}: {r['spill_bytes']} B" for r in rows
                if r.get("spill_bytes") and (re.search(r"4-bit (fp16|bf16) group 128", r["case"])
                                         or (r["kernel"] == "sign-1bit" and "fp32" not in r["case"]))]
    assert not spilling, "\n".join(spilling)


def test_refuses_the_interpreter():
    done = subprocess.run([sys.executable, "-m", "llmshrink.kernels.aot"], env={**os.environ, "TRITON_INTERPRET": "1"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "unset it" in done.stderr
