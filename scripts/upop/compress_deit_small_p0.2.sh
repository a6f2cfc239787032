#!/usr/bin/env bash
# UPop DeiT-S on ImageNet-1k, p = 0.2 (1.25x): 60 search + 300 retrain epochs on 8 GPUs x 512 images,
# masks re-ranked every 1000 optimizer steps (scale --interval with the total batch on other hardware).
# Published (spec upop.md §7.5, no distillation): top-1 80.8, top-5 95.4; 17.8 M params (-19%), 3.7 G FLOPs (-20%);
# dense DeiT-S 79.9 / 95.0, 22.0 M, 4.6 G (FLOPs as fvcore counts them: one per multiply-add).
exec "$(dirname "$0")/run.sh" compress classification configs/deit_small_upop.yaml 0.2 300 output/upop/deit_small_p0.2 \
  --interval 1000 "$@"
