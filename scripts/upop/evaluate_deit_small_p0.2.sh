#!/usr/bin/env bash
# Evaluates UPop DeiT-S p = 0.2 (1.25x) on ImageNet-1k val: the seed's released file, or CKPT=path (ours).
# Published (spec upop.md §7.5, no distillation): top-1 80.8, top-5 95.4; 17.8 M params (-19%), 3.7 G FLOPs (-20%);
# dense DeiT-S 79.9 / 95.0, 22.0 M, 4.6 G (FLOPs as fvcore counts them: one per multiply-add).
infer=(); [ -z "${CKPT:-}" ] && infer=(--infer_arch)  # the released file has no architecture description
exec "$(dirname "$0")/run.sh" evaluate classification configs/deit_small_upop.yaml \
  "${CKPT:-pretrained/deit_small_patch16_224_020x_compressed.pth}" output/upop/deit_small_p0.2_eval "${infer[@]}" "$@"
