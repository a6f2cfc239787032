#!/usr/bin/env bash
# Evaluates UPop retrieval flickr 4x (the released file, or CKPT=path). Published: TR@1 85.8, IR@1 71.3; 147.6 M params, 51.0 G FLOPs.
infer=(); [ -z "${CKPT:-}" ] && infer=(--infer_arch)  # the released file has no architecture description
exec "$(dirname "$0")/run.sh" evaluate retrieval configs/retrieval_flickr.yaml "${CKPT:-pretrained/model_base_retrieval_flickr_4x_compressed.pth}" output/upop/retrieval_flickr_4x_eval "${infer[@]}" "$@"
