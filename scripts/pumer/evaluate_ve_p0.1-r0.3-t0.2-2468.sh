#!/usr/bin/env bash
# Evaluates PuMer vilt-ve-p0.1r0.3t0.2-2468: ours, or the released folder (CKPT=...).
exec "$(dirname "$0")/run.sh" evaluate ve configs/vilt_ve.yaml ${CKPT:-output/pumer/ve_p0.1-r0.3-t0.2-2468/model_compressed.safetensors} output/pumer/ve_p0.1-r0.3-t0.2-2468 "$@"
