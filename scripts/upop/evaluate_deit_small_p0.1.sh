#!/usr/bin/env bash
# Evaluates UPop DeiT-S p = 0.1 (1.11x) on ImageNet-1k val: the seed's released file, or CKPT=path (ours).
# Published (spec upop.md §7.5, no distillation): top-1 81.1, top-5 95.4; 19.9 M params (-10%), 4.1 G FLOPs (-11%);
# dense DeiT-S 79.9 / 95.0, 22.0 M, 4.6 G (FLOPs as fvcore counts them: one per multiply-add).
infer=(); [ -z "${CKPT:-}" ] && infer=(--infer_arch)  # the released file has no architecture description
exec "$(dirname "$0")/run.sh" evaluate classification configs/deit_small_upop.yaml \
  "${CKPT:-pretrained/deit_small_patch16_224_010x_compressed.pth}" output/upop/deit_small_p0.1_eval "${infer[@]}" "$@"
