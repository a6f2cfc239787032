#!/usr/bin/env bash
# Shared by scripts/<method>/run.sh (one script per published row calls its method's run.sh).
#   run_pruner.sh PRUNER compress TASK CONFIG P EPOCHS OUT_DIR [more flags]   under torchrun (NPROC GPUs, default 8)
#   run_pruner.sh PRUNER evaluate TASK CONFIG CHECKPOINT OUT_DIR [more flags] evaluate a checkpoint on one process
set -euo pipefail
cd "$(dirname "$0")/.."
pruner=$1 mode=$2 task=$3 config=$4
shift 4
case $mode in
  compress)
    p=$1 epochs=$2 out=$3
    shift 3
    # "--" ends torchrun's own options: without it torchrun takes --p for an abbreviation of its flags.
    exec torchrun --nproc_per_node="${NPROC:-8}" -- "compress_${task}.py" --config "$config" \
      --pruner "$pruner" --p "$p" --epoch "$epochs" --output_dir "$out" "$@" ;;
  evaluate)
    ckpt=$1 out=$2
    shift 2
    exec "${PYTHON:-python}" "compress_${task}.py" --config "$config" --evaluate --pretrained "$ckpt" --output_dir "$out" "$@" ;;
  *) echo "usage: $0 PRUNER compress|evaluate TASK CONFIG ..." >&2; exit 2 ;;
esac
