#!/usr/bin/env bash
# UPop retrieval flickr 4x: p = 0.75, 18 search + 18 retrain epochs on 8 GPUs. Published: TR@1 85.8, IR@1 71.3; 147.6 M params, 51.0 G FLOPs.
exec "$(dirname "$0")/run.sh" compress retrieval configs/retrieval_flickr.yaml 0.75 18 output/upop/retrieval_flickr_4x "$@"
