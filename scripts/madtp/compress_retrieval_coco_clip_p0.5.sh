#!/usr/bin/env bash
# MADTP retrieval_coco_clip_p0.5: CLIP ViT-L/14@336, p = 0.5 (target 197.85 of 395.7 GFLOPs), 5 epochs at init_lr 1e-5; T calibrated first.
exec "$(dirname "$0")/run.sh" compress retrieval configs/retrieval_coco_clip.yaml 0.5 5 output/madtp/retrieval_coco_clip_p0.5 --set init_lr=1e-5 --set weight_decay=0.2 --set batch_size_train=16 --set batch_size_test=32 --pretrained pretrained/clip_large_retrieval_coco.pth "$@"
