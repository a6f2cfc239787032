#!/usr/bin/env bash
# PLATON caption 80 %: BLIP caption (CapFilt-L, fine-tuned on COCO) pruned to 20 % of its 168 masked Linears while
# fine-tuning 5 epochs on 2 GPUs (no pruning in epoch 1, cubic ramp over epochs 2-4, final ratio in epoch 5).
# The seed: train_caption.py --final_threshold 0.2 --pruner_name PLATON. Published numbers: see README.
exec "$(dirname "$0")/run.sh" compress caption configs/caption_coco.yaml 0.2 output/platon/caption_80 "$@"
