#!/usr/bin/env bash
# Students of other architectures on the built-in data (BENCHMARKS.md, "Students of other architectures"): the
# smoke teacher (84 iterations, as the learning checks measured it), then each timm student distilled from it with
# `smoke/distill_cnn_cpu_tiny` (200 iterations), and the k-NN at k=20 of the teacher, of each exported student (its
# EMA) and of each student at random init. ~45 min on 2 cores.
#   bash tools/bench/cnn_students.sh [OUT_DIR] [timm/resnet18 timm/mobilenetv4_conv_small timm/convnext_atto ...]
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-runs/cnn_students}
shift || true
ARCHS=("${@:-timm/resnet18 timm/mobilenetv4_conv_small timm/convnext_atto}")
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT"

[ -f "$OUT/teacher/teacher_backbone.pth" ] ||
    "$PY" -m dinotrain train --config smoke/cpu_tiny --output-dir "$OUT/teacher" train.OFFICIAL_EPOCH_LENGTH=7
"$PY" -m dinotrain eval knn --weights "$OUT/teacher" --tiny --baseline-random --output "$OUT/teacher.json"
for arch in ${ARCHS[@]}; do
    name=${arch//\//_}
    [ -d "$OUT/$name/students" ] ||
        "$PY" -m dinotrain distill --config smoke/distill_cnn_cpu_tiny --output-dir "$OUT/$name" \
            "student.arch=$arch" "distillation.teacher=$OUT/teacher"
    "$PY" -m dinotrain eval knn --weights "$OUT/$name" --tiny --baseline-random --output "$OUT/$name.json"
done
"$PY" - "$OUT" ${ARCHS[@]} <<'EOF'
import json, sys
out, archs = sys.argv[1], sys.argv[2:]
teacher = json.load(open(f"{out}/teacher.json"))["model"]["20"]
print(f"teacher (smoke, 84 iterations): k-NN k=20 {teacher:.2f} %")
for arch in archs:
    r = json.load(open(f"{out}/{arch.replace('/', '_')}.json"))
    got, rnd = r["model"]["20"], r["random_init"]["20"]
    print(f"{arch}: {got:.2f} % ({100 * got / teacher:.0f} % of the teacher), random init {rnd:.2f} % ({got - rnd:+.2f})")
EOF
