#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv, smoke-pretrain on the built-in tiny dataset,
# export the teacher to Hugging Face format, and k-NN-evaluate it against a random init.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
RUN=${RUN:-runs/smoke}
.venv/bin/dinotrain train --config smoke/cpu_tiny --output-dir "$RUN"
.venv/bin/dinotrain convert "$RUN/teacher_backbone.pth" "$RUN/export/hf" --to hf
.venv/bin/dinotrain eval knn --weights "$RUN" --tiny --baseline-random --output "$RUN/eval/knn.json"
