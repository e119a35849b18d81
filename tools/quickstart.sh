#!/usr/bin/env bash
# The main job on a fresh machine, on the built-in tiny dataset: set up .venv, smoke-pretrain, export the
# teacher (hub .pth, Hugging Face, full with heads), k-NN and linear evaluation (the best linear head exported as
# a transformers classifier), and embeddings of the val split. Rerunning it resumes/refreshes everything.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
RUN=${RUN:-runs/smoke}
DT=.venv/bin/dinotrain
step() { echo; echo "== $*"; }

step "smoke pretraining -> $RUN"
$DT train --config smoke/cpu_tiny --output-dir "$RUN"
step "export of the teacher"
$DT export "$RUN" "$RUN/export/teacher.pth" --to hub --force
$DT export "$RUN" "$RUN/export/hf" --to hf --force
$DT export "$RUN" "$RUN/export/full.safetensors" --to full --force
step "k-NN evaluation (trained teacher vs the same architecture at random init vs raw pixels)"
$DT eval knn --weights "$RUN" --tiny --baseline-random --baseline-pixels --output "$RUN/eval/knn.json"
step "linear evaluation (official sweep on cached features), best head as a transformers classifier"
$DT eval linear --weights "$RUN/export/hf" --tiny --output "$RUN/eval/linear.json" \
    --export-hf "$RUN/export/classifier" --force
step "embeddings of the val split"
VAL=$($DT tiny-dataset)/val
$DT embed "$VAL" --weights "$RUN/export/full.safetensors" --image-size 32 --output "$RUN/embeddings/val" --force

step "artifacts"
cat <<EOF
run directory      $RUN (config.yaml, metrics.jsonl, log.txt, checkpoints/)
hub backbone       $RUN/export/teacher.pth        torch.hub.load(".", "dinotrain_vit", source="local", weights=...)
Hugging Face       $RUN/export/hf                 transformers.AutoModel.from_pretrained(...)
full (with heads)  $RUN/export/full.safetensors   distillation.teacher=... or student.pretrained_weights=...
classifier         $RUN/export/classifier         transformers.AutoModelForImageClassification.from_pretrained(...)
k-NN results       $RUN/eval/knn.json
linear results     $RUN/eval/linear.json
embeddings         $RUN/embeddings/val/embeddings.npy + paths.txt
EOF
