#!/usr/bin/env bash
# Evaluates the ViLT NLVR2 -ft model on dev and test-P.
exec "$(dirname "$0")/run.sh" evaluate nlvr configs/vilt_nlvr.yaml ${CKPT:-output/nlvr_vilt/checkpoint_best.pth} output/nlvr_vilt "$@"
