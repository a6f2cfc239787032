#!/usr/bin/env bash
# Evaluate the materialised model of deit_small_r0.5041.sh (no pruner code; the harness protocol: bicubic, 0.875 crop).
exec "$(dirname "$0")/../run_pruner.sh" uvc evaluate classification configs/deit_uvc.yaml \
  "${1:-output/uvc/deit_small_r0.5041/model_compressed.safetensors}" output/uvc/deit_small_r0.5041/eval "${@:2}"
