#!/usr/bin/env bash
# Evaluates UPop CLIP retrieval coco 2x (the released file, or CKPT=path). Published: TR@1 70.8, IR@1 53.1; 473.7 M params, 196.3 G FLOPs.
infer=(); [ -z "${CKPT:-}" ] && infer=(--infer_arch)  # the released file has no architecture description
exec "$(dirname "$0")/run.sh" evaluate retrieval configs/retrieval_coco_clip.yaml "${CKPT:-pretrained/clip_large_retrieval_coco_2x_compressed.pth}" output/upop/retrieval_coco_clip_2x_eval "${infer[@]}" "$@"
