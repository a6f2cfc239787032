#!/usr/bin/env bash
# UPop nlvr 4x: p = 0.75, 23 search + 23 retrain epochs on 8 GPUs. Published: dev 72.85, test-P 73.55; 88.61 M params, 50.35 G FLOPs.
exec "$(dirname "$0")/run.sh" compress nlvr configs/nlvr.yaml 0.75 23 output/upop/nlvr_4x "$@"
