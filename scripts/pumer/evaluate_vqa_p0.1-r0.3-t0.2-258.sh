#!/usr/bin/env bash
# Evaluates PuMer vilt-vqa2-p0.1-r0.3-t0.2-258: ours, or the released folder (CKPT=pretrained/vilt-vqa2-p0.1-r0.3-t0.2-258).
exec "$(dirname "$0")/run.sh" evaluate vqa configs/vilt_vqa.yaml ${CKPT:-output/pumer/vqa_p0.1-r0.3-t0.2-258/model_compressed.safetensors} output/pumer/vqa_p0.1-r0.3-t0.2-258 "$@"
