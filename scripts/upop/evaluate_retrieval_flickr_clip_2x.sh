#!/usr/bin/env bash
# Evaluates UPop CLIP retrieval flickr 2x (the released file, or CKPT=path). Published: TR@1 93.2, IR@1 80.5; 474.3 M params, 201.1 G FLOPs.
infer=(); [ -z "${CKPT:-}" ] && infer=(--infer_arch)  # the released file has no architecture description
exec "$(dirname "$0")/run.sh" evaluate retrieval configs/retrieval_flickr_clip.yaml "${CKPT:-pretrained/clip_large_retrieval_flickr_2x_compressed.pth}" output/upop/retrieval_flickr_clip_2x_eval "${infer[@]}" "$@"
