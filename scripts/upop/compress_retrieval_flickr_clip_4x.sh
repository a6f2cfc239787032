#!/usr/bin/env bash
# UPop CLIP retrieval flickr 4x: p = 0.75, 18 search + 18 retrain epochs on 8 GPUs (CLIP ViT-L/14 at 336 px). Published: TR@1 82.9, IR@1 67.3; 278.5 M params, 102.6 G FLOPs.
exec "$(dirname "$0")/run.sh" compress retrieval configs/retrieval_flickr_clip.yaml 0.75 18 output/upop/retrieval_flickr_clip_4x "$@"
