#!/usr/bin/env bash
# The test command: sets up .venv (idempotent) and runs the whole suite on CPU.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not engine"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
