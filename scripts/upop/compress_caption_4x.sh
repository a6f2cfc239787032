#!/usr/bin/env bash
# UPop caption 4x: p = 0.75, 8 search + 8 retrain epochs on 8 GPUs. Published: CIDEr 117.4, SPICE 21.7; 76.5 M params, 22.2 G FLOPs.
exec "$(dirname "$0")/run.sh" compress caption configs/caption_coco.yaml 0.75 8 output/upop/caption_4x "$@"
