#!/usr/bin/env bash
# UPop CLIP retrieval flickr 2x: p = 0.5, 12 search + 12 retrain epochs on 8 GPUs (CLIP ViT-L/14 at 336 px). Published: TR@1 93.2, IR@1 80.5; 474.3 M params, 201.1 G FLOPs.
exec "$(dirname "$0")/run.sh" compress retrieval configs/retrieval_flickr_clip.yaml 0.5 12 output/upop/retrieval_flickr_clip_2x "$@"
