#!/usr/bin/env bash
# Evaluates PuMer vilt-nlvr2-p0.1r0.3t0.2-258: ours, or the released folder (CKPT=...).
exec "$(dirname "$0")/run.sh" evaluate nlvr configs/vilt_nlvr.yaml ${CKPT:-output/pumer/nlvr_p0.1-r0.3-t0.2-258/model_compressed.safetensors} output/pumer/nlvr_p0.1-r0.3-t0.2-258 "$@"
