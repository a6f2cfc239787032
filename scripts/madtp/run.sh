#!/usr/bin/env bash
# Shared by every scripts/madtp/*.sh row.
#   run.sh compress TASK CONFIG P EPOCHS OUT_DIR [more flags]   MADTP fine-tuning under torchrun (NPROC GPUs, default 8)
#   run.sh evaluate TASK CONFIG CHECKPOINT OUT_DIR [more flags] evaluate a MADTP checkpoint on one process
# A checkpoint is the seed's released {'model', 'epoch', 'temperature'} .pth (NLVR2 only; converted on loading) or
# our own model_compressed.safetensors (+ .json with the temperature) / checkpoint_best.pth. The kept token counts
# are batch maxima: evaluate at the seed's test batch (32 per GPU, VQA 16), which the scripts pass. DDP runs with
# find_unused_parameters, as the seed: a layer that keeps all its tokens leaves its alignment match without gradient.
set -euo pipefail
cd "$(dirname "$0")/../.."
mode=$1 task=$2 config=$3
shift 3
case $mode in
  compress)
    p=$1 epochs=$2 out=$3
    shift 3
    # "--" ends torchrun's own options: without it torchrun takes --p for an abbreviation of its flags.
    exec torchrun --nproc_per_node="${NPROC:-8}" -- "compress_${task}.py" --config "$config" \
      --pruner madtp --p "$p" --epoch "$epochs" --output_dir "$out" --set find_unused_parameters=true "$@" ;;
  evaluate)
    ckpt=$1 out=$2
    shift 2
    exec "${PYTHON:-python}" "compress_${task}.py" --config "$config" --evaluate --pretrained "$ckpt" --output_dir "$out" "$@" ;;
  *) echo "usage: $0 compress|evaluate TASK CONFIG ..." >&2; exit 2 ;;
esac
