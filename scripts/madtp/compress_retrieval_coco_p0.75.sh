#!/usr/bin/env bash
# MADTP retrieval_coco_p0.75: the seed's "p0.75" script passes --p 0.65 (target 53.62 of 153.2 GFLOPs), 10 epochs at init_lr 1e-7.
exec "$(dirname "$0")/run.sh" compress retrieval configs/retrieval_coco.yaml 0.65 10 output/madtp/retrieval_coco_p0.75 --set init_lr=1e-7 --set batch_size_train=32 --set batch_size_test=32 --pretrained pretrained/model_base_retrieval_coco.pth "$@"
