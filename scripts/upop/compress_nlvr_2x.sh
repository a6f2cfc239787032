#!/usr/bin/env bash
# UPop nlvr 2x: p = 0.5, 15 search + 15 retrain epochs on 8 GPUs. Published: dev 80.33, test-P 81.13; 150.15 M params, 89.36 G FLOPs.
exec "$(dirname "$0")/run.sh" compress nlvr configs/nlvr.yaml 0.5 15 output/upop/nlvr_2x "$@"
