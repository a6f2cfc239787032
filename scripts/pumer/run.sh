#!/usr/bin/env bash
# Shared by every scripts/pumer/*.sh row (ViLT-B/32; spec pumer_vilt.md 4).
#   run.sh ft TASK CONFIG EPOCHS OUT_DIR [more flags]            dense fine-tuning (the -ft baseline and teacher)
#   run.sh compress TASK CONFIG P R T LAYERS EPOCHS OUT_DIR [...] PuMer from the pre-trained model, distilling the -ft
#                                                                model (the config's pumer.teacher)
#   run.sh evaluate TASK CONFIG CHECKPOINT OUT_DIR [more flags]   evaluate one checkpoint on one process
# Training runs under torchrun on NPROC GPUs (default 8); the configs' per-GPU batches give PuMer's global ones on 8.
# A checkpoint is our checkpoint_best.pth / model_compressed.safetensors (+ .json: the reducers), PuMer's released
# folder (config.json + pytorch_model.bin: its reduction settings are read from config.json), the original ViLT .ckpt
# or a Hugging Face Vilt* folder.
set -euo pipefail
cd "$(dirname "$0")/../.."
mode=$1 task=$2 config=$3
shift 3
case $mode in
  ft)
    epochs=$1 out=$2
    shift 2
    exec torchrun --nproc_per_node="${NPROC:-8}" "compress_${task}.py" --config "$config" --epoch "$epochs" \
      --output_dir "$out" "$@" ;;
  compress)
    p=$1 r=$2 t=$3 layers=$4 epochs=$5 out=$6
    shift 6
    exec torchrun --nproc_per_node="${NPROC:-8}" "compress_${task}.py" --config "$config" --pruner pumer \
      --prune_r "$p" --merge_r "$r" --merge_text "$t" --reduce_layers "$layers" --epoch "$epochs" \
      --output_dir "$out" "$@" ;;
  evaluate)
    exec scripts/run_pruner.sh pumer evaluate "$task" "$config" "$@" ;;
  *) echo "usage: $0 ft|compress|evaluate TASK CONFIG ..." >&2; exit 2 ;;
esac
