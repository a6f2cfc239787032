#!/usr/bin/env bash
# UVC README row: DeiT-Small 79.8 -> 78.82 (-0.98) at 2.32 GMACs, 50.41 % of the FLOPs; the released log post-trained
# 150 epochs at 8 x 256 with alpha 1e-4 (best 78.822 at about epoch 56).
NPROC=${NPROC:-8} exec "$(dirname "$0")/run.sh" deit_small 0.5041 pretrained/deit_small_patch16_224-cd65a155.pth \
  output/uvc/deit_small_r0.5041 --set batch_size_train=256 --set teacher.alpha=1e-4 --epoch 150 "$@"
