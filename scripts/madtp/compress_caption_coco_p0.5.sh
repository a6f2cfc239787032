#!/usr/bin/env bash
# MADTP caption_coco_p0.5: the seed's "p0.5" script passes --p 0.4 (target 39.42 of 65.7 GFLOPs); T calibrated first. The seed only evaluates after calibration (its training loop is commented out); this trains 5 epochs.
exec "$(dirname "$0")/run.sh" compress caption configs/caption_coco.yaml 0.4 5 output/madtp/caption_coco_p0.5 --set init_lr=1e-5 --set batch_size_train=32 --set batch_size_test=32 --pretrained pretrained/model_base_caption_capfilt_large.pth "$@"
