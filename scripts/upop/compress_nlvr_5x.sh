#!/usr/bin/env bash
# UPop nlvr 5x: p = 0.8, 24 search + 24 retrain epochs on 8 GPUs. Published: dev 68.71, test-P 68.76; 76.81 M params, 39.93 G FLOPs.
exec "$(dirname "$0")/run.sh" compress nlvr configs/nlvr.yaml 0.8 24 output/upop/nlvr_5x "$@"
