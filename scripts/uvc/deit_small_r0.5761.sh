#!/usr/bin/env bash
# UVC README row: DeiT-Small 79.8 -> 79.44 (-0.36) at 2.65 GMACs, 57.61 % of the FLOPs. Post-training 120 epochs
# at 8 x 256 (the README's command; --set batch_size_train=256 with NPROC=8).
NPROC=${NPROC:-8} exec "$(dirname "$0")/run.sh" deit_small 0.5761 pretrained/deit_small_patch16_224-cd65a155.pth \
  output/uvc/deit_small_r0.5761 --set batch_size_train=256 "$@"
