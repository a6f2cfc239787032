#!/usr/bin/env bash
# UPop nlvr 10x: p = 0.9, 27 search + 27 retrain epochs on 8 GPUs. Published: dev 57.17, test-P 57.79; 54.48 M params, 19.08 G FLOPs.
exec "$(dirname "$0")/run.sh" compress nlvr configs/nlvr.yaml 0.9 27 output/upop/nlvr_10x "$@"
