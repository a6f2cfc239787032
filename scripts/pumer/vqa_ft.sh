#!/usr/bin/env bash
# ViLT VQAv2 -ft baseline (PuMer's teacher): 10 epochs from the pre-trained ViLT, global batch 512.
exec "$(dirname "$0")/run.sh" ft vqa configs/vilt_vqa.yaml 10 output/vqa_vilt "$@"
