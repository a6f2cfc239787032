#!/usr/bin/env bash
# Evaluates UPop retrieval coco 2x (the released file, or CKPT=path). Published: TR@1 77.4, IR@1 59.8; 248.9 M params, 88.3 G FLOPs.
infer=(); [ -z "${CKPT:-}" ] && infer=(--infer_arch)  # the released file has no architecture description
exec "$(dirname "$0")/run.sh" evaluate retrieval configs/retrieval_coco.yaml "${CKPT:-pretrained/model_base_retrieval_coco_2x_compressed.pth}" output/upop/retrieval_coco_2x_eval "${infer[@]}" "$@"
