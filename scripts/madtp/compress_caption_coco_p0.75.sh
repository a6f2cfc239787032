#!/usr/bin/env bash
# MADTP caption_coco_p0.75: p = 0.75 (target 16.43 of 65.7 GFLOPs), 5 epochs; T calibrated first.
exec "$(dirname "$0")/run.sh" compress caption configs/caption_coco.yaml 0.75 5 output/madtp/caption_coco_p0.75 --set init_lr=1e-5 --set batch_size_train=32 --set batch_size_test=32 --pretrained pretrained/model_base_caption_capfilt_large.pth "$@"
