#!/usr/bin/env bash
# Shared by every scripts/upop/*.sh row.
#   run.sh compress TASK CONFIG P EPOCHS OUT_DIR [more flags]   UPop search + retrain under torchrun (NPROC GPUs, default 8)
#   run.sh evaluate TASK CONFIG CHECKPOINT OUT_DIR [more flags] evaluate a compressed checkpoint on one process
# A compressed checkpoint is a released *_compressed.pth (architecture inferred from its shapes) or our own
# model_compressed.safetensors (+ .json) / .pth. Keep the per-GPU batch and scale upop.interval if NPROC != 8.
exec "$(dirname "$0")/../run_pruner.sh" upop "$@"
