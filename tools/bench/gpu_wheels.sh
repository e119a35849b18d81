#!/usr/bin/env bash
# Wheels the lent GPU machine lacks for tools/bench/gpu_checks.sh, into .whl/ (kept out of git through
# .git/info/exclude). Its image has torch, torchvision, timm, opencv, safetensors, scikit-learn, matplotlib, PyYAML;
# dinotrain's bench path needs omegaconf besides, and the peer lightly (installed without its dependencies, as
# here: its loss and head modules need none that the image lacks). Both are pure Python.
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 -d .whl omegaconf==2.4.0 lightly==1.6.0
ls -l .whl
