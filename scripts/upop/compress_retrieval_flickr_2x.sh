#!/usr/bin/env bash
# UPop retrieval flickr 2x: p = 0.5, 12 search + 12 retrain epochs on 8 GPUs. Published: TR@1 94.0, IR@1 82.0; 250.5 M params, 91.0 G FLOPs.
exec "$(dirname "$0")/run.sh" compress retrieval configs/retrieval_flickr.yaml 0.5 12 output/upop/retrieval_flickr_2x "$@"
