#!/usr/bin/env bash
# UPop retrieval coco 2x: p = 0.5, 6 search + 6 retrain epochs on 8 GPUs. Published: TR@1 77.4, IR@1 59.8; 248.9 M params, 88.3 G FLOPs.
exec "$(dirname "$0")/run.sh" compress retrieval configs/retrieval_coco.yaml 0.5 6 output/upop/retrieval_coco_2x "$@"
