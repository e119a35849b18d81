#!/usr/bin/env bash
# Create (or update) .venv with dinotrain installed in editable mode plus its test dependencies.
# Needs only Python >= 3.10 and access to PyPI. Idempotent: a second run takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[test]"
.venv/bin/python - <<'PY'
import torch, torchvision, transformers  # fail here, clearly, if the wheels do not fit together
print(f"dinotrain environment ready: torch {torch.__version__}, torchvision {torchvision.__version__}, "
      f"transformers {transformers.__version__}, CUDA available: {torch.cuda.is_available()}")
PY
