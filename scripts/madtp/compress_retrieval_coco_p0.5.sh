#!/usr/bin/env bash
# MADTP retrieval_coco_p0.5: the seed's "p0.5" script passes --p 0.45 (target 84.26 of 153.2 GFLOPs), 5 epochs at init_lr 1e-7.
exec "$(dirname "$0")/run.sh" compress retrieval configs/retrieval_coco.yaml 0.45 5 output/madtp/retrieval_coco_p0.5 --set init_lr=1e-7 --set batch_size_train=32 --set batch_size_test=32 --pretrained pretrained/model_base_retrieval_coco.pth "$@"
