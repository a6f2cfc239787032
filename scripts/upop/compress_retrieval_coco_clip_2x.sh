#!/usr/bin/env bash
# UPop CLIP retrieval coco 2x: p = 0.5, 6 search + 6 retrain epochs on 8 GPUs (CLIP ViT-L/14 at 336 px). Published: TR@1 70.8, IR@1 53.1; 473.7 M params, 196.3 G FLOPs.
exec "$(dirname "$0")/run.sh" compress retrieval configs/retrieval_coco_clip.yaml 0.5 6 output/upop/retrieval_coco_clip_2x "$@"
