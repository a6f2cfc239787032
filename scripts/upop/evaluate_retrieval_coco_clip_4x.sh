#!/usr/bin/env bash
# Evaluates UPop CLIP retrieval coco 4x (the released file, or CKPT=path). Published: TR@1 56.1, IR@1 41.1; 280.2 M params, 105.9 G FLOPs.
infer=(); [ -z "${CKPT:-}" ] && infer=(--infer_arch)  # the released file has no architecture description
exec "$(dirname "$0")/run.sh" evaluate retrieval configs/retrieval_coco_clip.yaml "${CKPT:-pretrained/clip_large_retrieval_coco_4x_compressed.pth}" output/upop/retrieval_coco_clip_4x_eval "${infer[@]}" "$@"
