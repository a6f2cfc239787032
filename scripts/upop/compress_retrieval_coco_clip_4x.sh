#!/usr/bin/env bash
# UPop CLIP retrieval coco 4x: p = 0.75, 9 search + 9 retrain epochs on 8 GPUs (CLIP ViT-L/14 at 336 px). Published: TR@1 56.1, IR@1 41.1; 280.2 M params, 105.9 G FLOPs.
exec "$(dirname "$0")/run.sh" compress retrieval configs/retrieval_coco_clip.yaml 0.75 9 output/upop/retrieval_coco_clip_4x "$@"
