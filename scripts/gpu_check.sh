#!/usr/bin/env bash
# The kernels issue's GPU check, as one command for a lent CUDA machine (the tool library's `device`):
#   correctness: every GPU-marked kernel test (the Triton GPTQ kernel over layouts, dtypes and rows,
#                every block shape its autotuner may pick, the 1-bit delta kernel), untuned for speed;
#   speed:       bench/kernels.py --only-gpu (Triton vs fp16 cuBLAS at rows 1/16/64/256; 1-bit kernel).
# The device image has torch, triton, transformers, peft, accelerate, safetensors, but not every
# package `import llmshrink` needs, and it cannot reach PyPI. So, first, here:
#     bash scripts/gpu_check.sh --prepare      # wheels of the missing packages into .whl/ (git-ignored)
# then on the device (carry [".whl"], timeout_s 600; GPU_CHECK_SECONDS, default 570, bounds the whole):
#     bash scripts/gpu_check.sh [tests|bench]  # both by default; logs: $OUT/gpu_tests.log, $OUT/gpu_bench.log
# (one part per call leaves each the whole call's time: cold Triton compiles and autotuning are slow)
# llmshrink is not pip-installed there: its files are laid out as the wheel has them (kernels/ and
# evals/ inside llmshrink/) in a scratch folder on PYTHONPATH, and python runs with -P so the
# repository's own llmshrink/ (without kernels) does not shadow it.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
MISSING="zstandard==0.23.0"  # imported by llmshrink.pack.codec; absent from the device's package list

if [ "${1:-}" = "--prepare" ]; then
  exclude=$(git rev-parse --git-path info/exclude) && mkdir -p "$(dirname "$exclude")" || exit 1
  grep -qxF "/.whl/" "$exclude" 2>/dev/null || echo "/.whl/" >> "$exclude"
  exec "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl $MISSING
fi

case ${1:-all} in
  all|tests|bench) ;;
  *) echo "usage: bash scripts/gpu_check.sh [--prepare|tests|bench|all]" >&2; exit 2 ;;
esac
out=${OUT:-/tmp/gpu_check}
site=$(mktemp -d /tmp/llmshrink_site.XXXX)
trap 'rm -rf "$site"' EXIT
mkdir -p "$out"
cp -r llmshrink "$site/" && cp -r kernels "$site/llmshrink/kernels" && cp -r evals "$site/llmshrink/evals" || exit 1
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl || exit 1
fi
export PYTHONPATH="$site" PYTHONUNBUFFERED=1

"$PY" -P -c "import torch, triton, llmshrink.kernels
print('torch', torch.__version__, 'triton', triton.__version__, 'llmshrink from', llmshrink.kernels.__file__,
      'cuda', torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else '')" 2>&1 | tee "$out/gpu_tests.log"
if [ "${PIPESTATUS[0]}" != 0 ]; then
  echo "gpu_check: llmshrink does not import here; if a package is missing, add it to MISSING, run" \
       "'bash scripts/gpu_check.sh --prepare' where pip works, and carry .whl" | tee -a "$out/gpu_tests.log"
  exit 1
fi

# Within one device call (600 s): tests first (cold Triton compiles, spread over processes where
# pytest-xdist is there), then the bench with what is left; each stops itself rather than be killed.
budget=${GPU_CHECK_SECONDS:-570}
left() { local n=$((budget - SECONDS)); echo $((n < 1 ? 1 : n)); }  # `timeout 0` would mean no limit
part=${1:-all}
tests=skipped bench=skipped
if [ "$part" = all ] || [ "$part" = tests ]; then
  workers=$("$PY" -P -c "import xdist" 2>/dev/null && echo "-n 8")
  share=$([ "$part" = all ] && echo $((budget / 2)) || left)
  LLMSHRINK_TRITON_AUTOTUNE=0 timeout "$share" "$PY" -P -m pytest -q -m gpu -p no:cacheprovider -rs $workers \
    tests/unit/test_kernels.py tests/unit/test_delta.py 2>&1 | tee -a "$out/gpu_tests.log"
  tests=${PIPESTATUS[0]}
fi
if [ "$part" = all ] || [ "$part" = bench ]; then
  timeout "$(left)" "$PY" -P bench/kernels.py --only-gpu 2>&1 | tee "$out/gpu_bench.log"
  bench=${PIPESTATUS[0]}
fi
echo "gpu_check: tests exit $tests, bench exit $bench"
[ "$tests" != 0 ] && [ "$tests" != skipped ] && exit 1
[ "$bench" = 0 ] || [ "$bench" = skipped ]
