#!/usr/bin/env bash
# The main job: set up (idempotent), prepare the embedded default model and 8 adapters,
# serve them with vllm-slora enabled and run a short multi-adapter workload.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/vllm-slora demo "$@"
