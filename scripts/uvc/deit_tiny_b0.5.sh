#!/usr/bin/env bash
# UVC README command 1: DeiT-Tiny, budget 0.5, 2 GPUs x 512, 30 (+1) search epochs, KD alpha 0.1; then post-training.
# Released stage-1 log: R 100 % -> 41.5 % by epoch 10, 42.7 % at the end (about 7 of 12 blocks skipped), val 56.3 %.
# Paper (unverified): DeiT-Tiny 72.2 -> about 71.3 at about 50 % FLOPs.
exec "$(dirname "$0")/run.sh" deit_tiny 0.5 pretrained/deit_tiny_patch16_224-a1311bcf.pth output/uvc/deit_tiny_b0.5 "$@"
