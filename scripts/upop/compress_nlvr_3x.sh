#!/usr/bin/env bash
# UPop nlvr 3x: p = 0.667, 20 search + 20 retrain epochs on 8 GPUs. Published: dev 76.89, test-P 77.61; 109.01 M params, 65.29 G FLOPs.
exec "$(dirname "$0")/run.sh" compress nlvr configs/nlvr.yaml 0.667 20 output/upop/nlvr_3x "$@"
