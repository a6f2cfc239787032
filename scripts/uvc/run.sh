#!/usr/bin/env bash
# Shared by the UVC row scripts: run.sh MODEL BUDGET TEACHER OUT_DIR [more flags], under torchrun (NPROC GPUs, default 2
# as the release). TEACHER is the official DeiT file: the student's start and the uncompressed teacher.
set -euo pipefail
cd "$(dirname "$0")/../.."
model=$1 budget=$2 teacher=$3 out=$4
shift 4
exec torchrun --nproc_per_node="${NPROC:-2}" -- compress_classification.py --config configs/deit_uvc.yaml \
  --set vit="$model" --pretrained "$teacher" --set teacher.path="$teacher" \
  --pruner uvc --budget "$budget" --output_dir "$out" "$@"
