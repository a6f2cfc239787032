#!/usr/bin/env bash
# Evaluates UPop DeiT-S p = 0.4 (1.67x) on ImageNet-1k val: the seed's released file, or CKPT=path (ours).
# Published (spec upop.md §7.5, no distillation): top-1 79.6, top-5 94.8; 13.5 M params (-39%), 2.8 G FLOPs (-39%);
# dense DeiT-S 79.9 / 95.0, 22.0 M, 4.6 G (FLOPs as fvcore counts them: one per multiply-add).
infer=(); [ -z "${CKPT:-}" ] && infer=(--infer_arch)  # the released file has no architecture description
exec "$(dirname "$0")/run.sh" evaluate classification configs/deit_small_upop.yaml \
  "${CKPT:-pretrained/deit_small_patch16_224_040x_compressed.pth}" output/upop/deit_small_p0.4_eval "${infer[@]}" "$@"
