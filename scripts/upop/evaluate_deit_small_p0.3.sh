#!/usr/bin/env bash
# Evaluates UPop DeiT-S p = 0.3 (1.42x) on ImageNet-1k val: the seed's released file, or CKPT=path (ours).
# Published (spec upop.md §7.5, no distillation): top-1 80.2, top-5 95.1; 15.7 M params (-29%), 3.2 G FLOPs (-30%);
# dense DeiT-S 79.9 / 95.0, 22.0 M, 4.6 G (FLOPs as fvcore counts them: one per multiply-add).
infer=(); [ -z "${CKPT:-}" ] && infer=(--infer_arch)  # the released file has no architecture description
exec "$(dirname "$0")/run.sh" evaluate classification configs/deit_small_upop.yaml \
  "${CKPT:-pretrained/deit_small_patch16_224_030x_compressed.pth}" output/upop/deit_small_p0.3_eval "${infer[@]}" "$@"
