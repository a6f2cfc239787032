#!/usr/bin/env bash
# Evaluates UPop retrieval flickr 2x (the released file, or CKPT=path). Published: TR@1 94.0, IR@1 82.0; 250.5 M params, 91.0 G FLOPs.
infer=(); [ -z "${CKPT:-}" ] && infer=(--infer_arch)  # the released file has no architecture description
exec "$(dirname "$0")/run.sh" evaluate retrieval configs/retrieval_flickr.yaml "${CKPT:-pretrained/model_base_retrieval_flickr_2x_compressed.pth}" output/upop/retrieval_flickr_2x_eval "${infer[@]}" "$@"
