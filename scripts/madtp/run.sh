#!/usr/bin/env bash
# Shared by every scripts/madtp/*.sh row.
#   run.sh compress TASK CONFIG P EPOCHS OUT_DIR [more flags]   MADTP fine-tuning under torchrun (NPROC GPUs, default 8)
#   run.sh evaluate TASK CONFIG CHECKPOINT OUT_DIR [more flags] evaluate a MADTP checkpoint on one process
# A checkpoint is the seed's released {'model', 'epoch', 'temperature'} .pth (NLVR2 only; converted on loading) or
# our own model_compressed.safetensors (+ .json with the temperature) / checkpoint_best.pth. The kept token counts
# are batch maxima: evaluate at the seed's test batch (32 per GPU, VQA 16), which the scripts pass. DDP runs with
# find_unused_parameters, as the seed: a layer that keeps all its tokens leaves its alignment match without gradient.
if [ "${1:-}" = compress ]; then set -- "$@" --set find_unused_parameters=true; fi
exec "$(dirname "$0")/../run_pruner.sh" madtp "$@"
