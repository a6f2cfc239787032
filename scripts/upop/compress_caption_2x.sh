#!/usr/bin/env bash
# UPop caption 2x: p = 0.5, 5 search + 5 retrain epochs on 8 GPUs. Published: CIDEr 128.9, SPICE 23.3; 127.1 M params, 39.8 G FLOPs.
exec "$(dirname "$0")/run.sh" compress caption configs/caption_coco.yaml 0.5 5 output/upop/caption_2x "$@"
