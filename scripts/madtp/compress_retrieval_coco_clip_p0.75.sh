#!/usr/bin/env bash
# MADTP retrieval_coco_clip_p0.75: CLIP ViT-L/14@336, p = 0.75 (target 98.92 GFLOPs), 5 epochs; T calibrated first.
exec "$(dirname "$0")/run.sh" compress retrieval configs/retrieval_coco_clip.yaml 0.75 5 output/madtp/retrieval_coco_clip_p0.75 --set init_lr=1e-5 --set weight_decay=0.2 --set batch_size_train=16 --set batch_size_test=32 --pretrained pretrained/clip_large_retrieval_coco.pth "$@"
