#!/usr/bin/env bash
# Evaluates UPop CLIP retrieval flickr 4x (the released file, or CKPT=path). Published: TR@1 82.9, IR@1 67.3; 278.5 M params, 102.6 G FLOPs.
infer=(); [ -z "${CKPT:-}" ] && infer=(--infer_arch)  # the released file has no architecture description
exec "$(dirname "$0")/run.sh" evaluate retrieval configs/retrieval_flickr_clip.yaml "${CKPT:-pretrained/clip_large_retrieval_flickr_4x_compressed.pth}" output/upop/retrieval_flickr_clip_4x_eval "${infer[@]}" "$@"
