#!/usr/bin/env bash
# Evaluates UPop retrieval coco 4x (the released file, or CKPT=path). Published: TR@1 62.9, IR@1 47.4; 147.9 M params, 50.2 G FLOPs.
infer=(); [ -z "${CKPT:-}" ] && infer=(--infer_arch)  # the released file has no architecture description
exec "$(dirname "$0")/run.sh" evaluate retrieval configs/retrieval_coco.yaml "${CKPT:-pretrained/model_base_retrieval_coco_4x_compressed.pth}" output/upop/retrieval_coco_4x_eval "${infer[@]}" "$@"
