#!/usr/bin/env bash
# Evaluates the ViLT SNLI-VE -ft model on dev and test.
exec "$(dirname "$0")/run.sh" evaluate ve configs/vilt_ve.yaml ${CKPT:-output/ve/checkpoint_best.pth} output/ve "$@"
