#!/usr/bin/env bash
# UPop retrieval coco 4x: p = 0.75, 9 search + 9 retrain epochs on 8 GPUs. Published: TR@1 62.9, IR@1 47.4; 147.9 M params, 50.2 G FLOPs.
exec "$(dirname "$0")/run.sh" compress retrieval configs/retrieval_coco.yaml 0.75 9 output/upop/retrieval_coco_4x "$@"
