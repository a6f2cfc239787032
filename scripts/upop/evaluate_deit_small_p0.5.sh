#!/usr/bin/env bash
# Evaluates UPop DeiT-S p = 0.5 (2.00x) on ImageNet-1k val: the seed's released file, or CKPT=path (ours).
# Published (spec upop.md §7.5, no distillation): top-1 78.9, top-5 94.6; 11.4 M params (-48%), 2.3 G FLOPs (-50%);
# dense DeiT-S 79.9 / 95.0, 22.0 M, 4.6 G (FLOPs as fvcore counts them: one per multiply-add).
infer=(); [ -z "${CKPT:-}" ] && infer=(--infer_arch)  # the released file has no architecture description
exec "$(dirname "$0")/run.sh" evaluate classification configs/deit_small_upop.yaml \
  "${CKPT:-pretrained/deit_small_patch16_224_050x_compressed.pth}" output/upop/deit_small_p0.5_eval "${infer[@]}" "$@"
