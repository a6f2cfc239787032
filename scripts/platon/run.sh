#!/usr/bin/env bash
# Shared by every scripts/platon/*.sh row (PLATON / magnitude, with or without intrinsic-dimension weighting).
#   run.sh compress TASK CONFIG FINAL_THRESHOLD OUT_DIR [more flags]  prune while fine-tuning, under torchrun
#                                                                     (NPROC processes, default 2 as in the seed)
#   run.sh ids TASK CONFIG OUT_DIR [more flags]                       intrinsic dimension of every masked module of the
#                                                                     dense model named in CONFIG (compute_id.py)
#   run.sh evaluate TASK CONFIG CHECKPOINT OUT_DIR [more flags]       evaluate a pruned checkpoint on one process
# FINAL_THRESHOLD is the kept fraction of the masked weights and biases: 0.2 = 80 % sparsity.
# The seed's recipe per task (batch per GPU, learning rate, weight decay, epochs) is set here; its schedule
# ("warm-up" = one epoch) follows the real number of steps per epoch, so another NPROC keeps the epochs
# but changes the global batch (scale init_lr with it, or keep NPROC=2).
# A pruned checkpoint is an ordinary dense checkpoint whose pruned weights are zeros: no masks are needed
# to evaluate it, and it runs no faster than the dense model.
set -euo pipefail
cd "$(dirname "$0")/../.."
mode=$1 task=$2 config=$3
shift 3
case $task in
  # Nofear18/ID_VL_Pruning train_caption.py + configs/caption_coco.yaml: batch 20 per GPU, lr 1e-5, no weight decay.
  caption) recipe=(--epoch 5 --set batch_size_train=20 --set init_lr=1e-5 --set min_lr=0 --set weight_decay=0.0) ;;
  # train_nlvr.py + configs/nlvr.yaml: batch 10 per GPU, lr 3e-5, weight decay 0.05.
  nlvr) recipe=(--epoch 10 --set batch_size_train=10 --set init_lr=3e-5 --set min_lr=0 --set weight_decay=0.05) ;;
  # train_clip_flickr30k.py + configs/retrieval_flickr_clip.yaml (CLIP; the seed has no BLIP retrieval row): batch 2
  # per GPU, lr 1e-5, weight decay 0.2, 5 epochs.
  retrieval) recipe=(--epoch 5 --set batch_size_train=2 --set init_lr=1e-5 --set min_lr=0 --set weight_decay=0.2) ;;
  *) echo "run.sh: no PLATON recipe for task '$task' (caption, nlvr, retrieval)" >&2; exit 2 ;;
esac
case $mode in
  compress)
    threshold=$1 out=$2
    shift 2
    # "--" ends torchrun's own options: without it torchrun takes --p-like flags for abbreviations of its own.
    exec torchrun --nproc_per_node="${NPROC:-2}" -- "compress_${task}.py" --config "$config" --pruner platon \
      --final_threshold "$threshold" --output_dir "$out" "${recipe[@]}" "$@" ;;
  ids)
    out=$1
    shift
    # The seed's ComputeID settings: 2000 training samples (training transform, seed 999), every masked Linear's
    # whole output flattened, TwoNN without discard averaged over block sizes 1..20. Writes OUT_DIR/ids.json.
    exec "${PYTHON:-python}" compute_id.py --config "$config" --task "$task" -n 2000 --output "$out" "$@" ;;
  evaluate)
    ckpt=$1 out=$2
    shift 2
    exec "${PYTHON:-python}" "compress_${task}.py" --config "$config" --evaluate --pretrained "$ckpt" \
      --output_dir "$out" "$@" ;;
  *) echo "usage: $0 compress|ids|evaluate TASK CONFIG ..." >&2; exit 2 ;;
esac
