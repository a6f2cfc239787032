#!/usr/bin/env bash
# ViLT SNLI-VE -ft baseline (PuMer's teacher; its command block is empty: the VQA settings, 10 epochs).
exec "$(dirname "$0")/run.sh" ft ve configs/vilt_ve.yaml 10 output/ve "$@"
